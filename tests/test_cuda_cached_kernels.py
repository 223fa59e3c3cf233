"""CUDA kernels of the cached TT ops against the CPU reference (``pytest -m gpu``).

``tt_cached_embedding_bag_forward`` / ``tt_cached_embedding_bag_backward_fused_`` on CUDA
run hits and misses through one pass of the TT kernels; the CPU kernel splits the lookup
and calls the TT ops (themselves checked against float64 oracles in test_cpp_kernels.py and
test_cuda_kernels.py). Cases: no hits, some, all; hot cached ids whose runs cross many
reduction chunks; every optimizer; int32 ids; mean pooling with weights; bitwise
determinism; a cached module step captured in a CUDA graph.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_graph_replay import assert_graph_replay_matches_eager
from test_cuda_kernels import SHAPES, make_cores, rel_err, zipf_ids

import torchrec_tt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not torchrec_tt.HAS_CUDA_KERNELS, reason="torchrec_tt._C built without the CUDA kernels"),
]

tt = torch.ops.torchrec_tt
DEV = "cuda"
EMPTY = torch.iinfo(torch.int64).max


def _cache(ids: torch.Tensor, n: int, size: int, which: str, dim: int, dtype=torch.float64):
    """Sorted cache ids (padded with EMPTY) holding none / the hottest / all of the looked-up ids."""
    uniq, counts = torch.unique(ids, return_counts=True)
    if which == "none":
        chosen = torch.tensor([n + 5], dtype=torch.long)[:0]
    elif which == "all":
        chosen = uniq
    else:
        chosen = uniq[torch.argsort(counts, descending=True)[: max(1, uniq.numel() // 3)]]
    chosen = chosen[:size] if which != "all" else chosen
    cache_ids = torch.full((max(size, chosen.numel()) + 2,), EMPTY, dtype=torch.long)
    cache_ids[: chosen.numel()] = torch.sort(chosen).values
    weight = torch.randn(cache_ids.numel(), dim, dtype=dtype)
    return cache_ids, weight


def _counters(device="cpu", slots=4096):
    """(hash_keys, hash_counts, stats) of an empty LFU frequency table."""
    return (torch.full((slots,), EMPTY, device=device), torch.zeros(slots, dtype=torch.long, device=device),
            torch.zeros(6, dtype=torch.long, device=device))


def _stored(keys, counts):
    return {k: c for k, c in zip(keys.tolist(), counts.tolist(), strict=True) if k != EMPTY}


def _batch(n, nnz, num_bags, gen_seed=0):
    torch.manual_seed(gen_seed)
    ids = zipf_ids(n, nnz)
    cuts = torch.sort(torch.randint(0, nnz + 1, (num_bags - 1,))).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([nnz])])
    return ids, offsets


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4], SHAPES[5]], ids=lambda s: f"p{s[0]}")
@pytest.mark.parametrize("which", ["none", "some", "all"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("mode", [0, 1])
def test_cached_forward_matches_reference(shape, which, index_dtype, mode):
    p, q, ranks, n = shape
    dim = math.prod(q)
    cores = make_cores(p, q, ranks)
    ids, offsets = _batch(n, 700, 50)
    cache_ids, weight = _cache(ids, n, 40, which, dim)
    w = torch.rand(ids.numel(), dtype=torch.float64) + 0.5
    want_keys, want_counts, want_stats = _counters()
    want = tt.tt_cached_embedding_bag_forward(
        cores, cache_ids, weight, want_keys, want_counts, want_stats, ids, offsets, w, p, q, ranks, n, mode, 8, True
    )
    assert want_stats[4] == 0  # room for every id: the counts below are exact
    for dtype in (torch.float64, torch.float32):
        keys, counts, stats = _counters(DEV)
        got = tt.tt_cached_embedding_bag_forward(
            [c.to(DEV, dtype) for c in cores], cache_ids.to(DEV), weight.to(DEV, dtype), keys, counts, stats,
            ids.to(DEV, index_dtype), offsets.to(DEV, index_dtype), w.to(DEV, dtype), p, q, ranks, n, mode, 8, True,
        )
        assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-5), dtype
        assert stats.tolist() == want_stats.tolist()
        assert _stored(keys, counts) == _stored(want_keys, want_counts)
    assert want_stats[0] == ids.numel()
    if which == "all":
        assert want_stats[1:3].tolist() == [ids.numel(), 0]
    if which == "none":
        assert want_stats[1] == 0


def test_cached_forward_empty_bags_and_empty_batch():
    p, q, ranks, n = SHAPES[3]
    cores = [c.to(DEV) for c in make_cores(p, q, ranks)]
    cache_ids, weight = torch.tensor([3, 9, EMPTY], device=DEV), torch.randn(3, 64, device=DEV, dtype=torch.float64)
    keys, counts, stats = _counters(DEV)
    out = tt.tt_cached_embedding_bag_forward(
        cores, cache_ids, weight, keys, counts, stats, torch.zeros(0, dtype=torch.long, device=DEV),
        torch.zeros(4, dtype=torch.long, device=DEV), None, p, q, ranks, n, 1, 8, True,
    )
    assert out.shape == (3, 64) and not out.any() and not stats.any() and not counts.any()


def test_cached_forward_counts_what_a_full_hash_table_drops():
    p, q, ranks, n = SHAPES[3]
    cores = [c.to(DEV) for c in make_cores(p, q, ranks)]
    ids, offsets = _batch(n, 3000, 30)
    cache_ids, weight = _cache(ids, n, 40, "some", 64)
    keys, counts, stats = _counters(DEV, slots=64)  # far fewer slots than distinct ids
    tt.tt_cached_embedding_bag_forward(
        cores, cache_ids.to(DEV), weight.to(DEV), keys, counts, stats, ids.to(DEV), offsets.to(DEV), None, p, q, ranks, n,
        0, 2, True,
    )
    stored = _stored(keys, counts)
    assert len(stored) == 64 and stats[4] > 0
    assert int(stats[4]) + sum(stored.values()) == ids.numel()  # every access counted or reported dropped
    uniq, freq = torch.unique(ids, return_counts=True)
    assert stored == {k: c for k, c in zip(uniq.tolist(), freq.tolist(), strict=True) if k in stored}  # exact counts


@pytest.mark.parametrize(
    "shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4], SHAPES[5]], ids=lambda s: f"p{s[0]}"
)
@pytest.mark.parametrize("optimizer", [0, 1, 2])
@pytest.mark.parametrize("which", ["some", "all", "none"])
def test_cached_fused_matches_reference(shape, optimizer, which):
    p, q, ranks, n = shape
    dim = math.prod(q)
    cores = make_cores(p, q, ranks)
    ids, offsets = _batch(n, 6000, 120, gen_seed=1)  # the hottest id: ~1000 positions, runs over many chunks
    cache_ids, weight = _cache(ids, n, 60, which, dim)
    w = torch.rand(ids.numel(), dtype=torch.float64) + 0.5
    g = torch.randn(120, dim, dtype=torch.float64)
    if optimizer == 0:
        state, cstate = [], []
    elif optimizer == 1:
        state, cstate = [torch.rand_like(c) + 0.1 for c in cores], [torch.rand_like(weight) + 0.1]
    else:
        state = [torch.rand(c.shape[0], dtype=torch.float64) + 0.1 for c in cores]
        cstate = [torch.rand(weight.shape[0], dtype=torch.float64) + 0.1]
    ref = ([c.clone() for c in cores], [s.clone() for s in state], weight.clone(), [s.clone() for s in cstate])
    tt.tt_cached_embedding_bag_backward_fused_(
        g, ref[0], ref[1], cache_ids, ref[2], ref[3], ids, offsets, w, p, q, ranks, n, 1, optimizer, 0.05, 1e-8
    )
    dev = ([c.to(DEV) for c in cores], [s.to(DEV) for s in state], weight.to(DEV), [s.to(DEV) for s in cstate])
    tt.tt_cached_embedding_bag_backward_fused_(
        g.to(DEV), dev[0], dev[1], cache_ids.to(DEV), dev[2], dev[3], ids.to(DEV, torch.int32), offsets.to(DEV), w.to(DEV),
        p, q, ranks, n, 1, optimizer, 0.05, 1e-8,
    )
    for got, want, before in zip(dev[0] + [dev[2]], ref[0] + [ref[2]], cores + [weight], strict=True):
        delta_ref, delta = want - before, got.cpu() - before
        if delta_ref.abs().sum() == 0:
            assert torch.equal(got.cpu(), before)
            continue
        assert rel_err(delta, delta_ref) < 1e-9
        untouched = delta_ref.abs().sum(dim=1) == 0
        assert torch.equal(got.cpu()[untouched], before[untouched])
    for got, want in zip(dev[1] + dev[3], ref[1] + ref[3], strict=True):
        assert rel_err(got, want) < 1e-10
    if which == "all":
        assert all(torch.equal(a.cpu(), b) for a, b in zip(dev[0], cores, strict=True))  # no TT id: cores untouched


def test_cached_ops_bitwise_deterministic():
    p, q, ranks, n = [200, 220, 250], [4, 4, 4], [1, 32, 32, 1], 11_000_000
    cores = [c.to(DEV, torch.float32) for c in make_cores(p, q, ranks, scale=0.1)]
    ids = (zipf_ids(200_000, 60_000) * 37 % n).to(DEV)
    offsets = torch.arange(0, 60_001, 20, device=DEV)
    hot = torch.unique(ids)[:5000]
    cache_ids = torch.sort(hot).values
    weight = torch.randn(cache_ids.numel(), 64, device=DEV)
    g = torch.randn(3000, 64, device=DEV)
    outs = [
        tt.tt_cached_embedding_bag_forward(cores, cache_ids, weight, *_counters(DEV), ids, offsets, None, p, q, ranks, n, 0, 8, False)
        for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1])
    results = []
    for _ in range(2):
        c, cw = [x.clone() for x in cores], weight.clone()
        s, cs = [torch.zeros(x.shape[0], device=DEV) for x in cores], [torch.zeros(cw.shape[0], device=DEV)]
        tt.tt_cached_embedding_bag_backward_fused_(g, c, s, cache_ids, cw, cs, ids, offsets, None, p, q, ranks, n, 0, 2, 0.1, 1e-8)
        results.append(c + s + [cw] + cs)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_cached_module_step_in_a_cuda_graph():
    """A cached training step (forward, loss, fused Adagrad on cores and cached rows) captured and replayed."""
    from torchrec_tt import TTEmbeddingBag  # noqa: PLC0415
    from torchrec_tt.modules.optim_types import OptimType  # noqa: PLC0415

    p, q, ranks, n = [50, 60, 70], [4, 4, 4], [32, 32], 200_000
    num_bags, bag = 256, 10

    def make():
        torch.manual_seed(3)
        return TTEmbeddingBag(
            n, 64, p, q, ranks, sparse=True, optimizer=OptimType.EXACT_ADAGRAD, learning_rate=0.05, use_cache=True,
            cache_size=512, device=DEV,
        )

    table, twin = make(), make()
    ids_all = [(zipf_ids(20_000, num_bags * bag) * 7 % n).to(DEV) for _ in range(4)]
    offsets = torch.arange(0, num_bags * bag + 1, bag, device=DEV)
    target = torch.randn(num_bags, 64, device=DEV)
    with torch.no_grad():
        twin(ids_all[0], offsets[:-1])
    twin.cache_populate()
    table.load_state_dict(twin.state_dict())  # the same cached ids (which ids a full hash table drops can vary)

    def step(module, ids):
        loss = (module(ids, offsets[:-1]) - target).pow(2).sum()
        loss.backward()

    def params(m):
        c = m.cache
        return [x.detach() for x in m.tt_cores] + m.optimizer_states() + [c.cache_weight, c.cache_optimizer_state]

    start_cache = table.cache.cache_weight.clone()
    assert_graph_replay_matches_eager(step, table, twin, params, ids_all)
    assert not torch.equal(table.cache.cache_weight, start_cache)  # the cached rows trained
