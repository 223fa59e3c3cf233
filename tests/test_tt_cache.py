"""The LFU cache of hot rows (``use_cache=True``) against independent oracles.

The oracle of a cached table is a float64 dense table: TT rows by einsum
(``oracles.dense_table``) with the cached rows overlaid, trained by autograd and
``torch.optim`` (row-wise Adagrad written out). The oracle of the cache
contents is an LFU over a Python ``Counter`` of the ids looked up in training.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from oracles import dense_table, pooled
from torch import nn

from torchrec_tt import OptimType, TTEmbeddingBag
from torchrec_tt.modules.tt_cache import EMPTY_ID, TTRowCache, fit_tt_rows_

N, D = 60, 6


def _make(cache_size=5, **kw):
    kw.setdefault("dtype", torch.float64)
    kw.setdefault("sparse", True)
    kw.setdefault("use_cache", True)
    kw.setdefault("hashtbl_size", 256)
    return TTEmbeddingBag(N, D, [5, 4, 3], [3, 1, 2], [3, 2], cache_size=cache_size, **kw)


def _tt_table(emb, cores=None):
    cores = [c.detach().double() for c in emb.tt_cores] if cores is None else cores
    return dense_table(cores, emb.tt_p_shapes, emb.tt_q_shapes, emb.tt_ranks, emb.num_embeddings)


def _counts(cache) -> dict[int, int]:
    keys, counts = cache.hash_keys.tolist(), cache.hash_counts.tolist()
    return {int(k): int(c) for k, c in zip(keys, counts, strict=True) if k != EMPTY_ID}


def _cached(emb) -> dict[int, torch.Tensor]:
    ids = emb.cache.cache_ids.tolist()
    return {i: emb.cache.cache_weight[s].detach().double().clone() for s, i in enumerate(ids) if i != EMPTY_ID}


def _lfu(counter: Counter, size: int) -> list[int]:
    return sorted(sorted(counter, key=lambda i: (-counter[i], i))[:size])


def _batch(gen, hot=(3, 7, 11, 19), num_bags=5, max_len=6):
    lengths = torch.randint(0, max_len, (num_bags,), generator=gen)
    lengths[0] = 0  # an empty bag
    ids = torch.randint(0, N, (int(lengths.sum()),), generator=gen)
    hot_t = torch.tensor(hot)
    mask = torch.rand(ids.numel(), generator=gen) < 0.6
    ids[mask] = hot_t[torch.randint(0, len(hot), (int(mask.sum()),), generator=gen)]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    weights = torch.rand(ids.numel(), dtype=torch.float64, generator=gen)
    return ids, offsets, weights


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cached_forward_equals_dense_oracle_with_cached_rows_overlaid(mode, index_dtype):
    emb = _make(mode=mode)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids, offsets, _ = _batch(gen)
        emb(ids, offsets[:-1])
    emb.cache_populate()
    with torch.no_grad():  # cached values that differ from the TT rows: they must be what is served
        emb.cache.cache_weight.add_(torch.randn_like(emb.cache.cache_weight))
    table = _tt_table(emb)
    for i, row in _cached(emb).items():
        table[i] = row
    ids, offsets, weights = _batch(gen, num_bags=7)
    ids, offsets = ids.to(index_dtype), offsets.to(index_dtype)
    m = 1 if mode == "mean" else 0
    for w in (None, weights):
        expected = pooled(table, ids, offsets, w, m)
        torch.testing.assert_close(_fwd(emb, ids, offsets, w), expected)
    assert emb.cache_stats()["hits"] > 0


def _fwd(emb, ids, offsets, w):
    with torch.no_grad():
        return emb(ids, offsets[:-1], w)


def test_full_weight_shows_cached_rows():
    emb = _make()
    emb(torch.tensor([4, 4, 9]), torch.tensor([0]))
    emb.cache_populate()
    with torch.no_grad():
        emb.cache.cache_weight.fill_(2.5)
    weight = emb.full_weight().detach()
    assert torch.all(weight[[4, 9]] == 2.5)
    torch.testing.assert_close(weight[[0, 1, 59]], _tt_table(emb)[[0, 1, 59]])


# ----------------------------------------------------------------------------- training
def _oracle_step(optimizer, lr, eps, params, opt, row_state):
    if opt is not None:
        opt.step()
        return
    with torch.no_grad():
        for prm, s in zip(params, row_state, strict=True):
            if prm.grad is None:
                continue
            g = prm.grad if prm.dim() == 2 else prm.grad.unsqueeze(0)
            s += (g**2).mean(dim=-1).reshape(s.shape)
            prm -= lr * prm.grad / (s.sqrt() + eps).reshape(-1, *([1] * (prm.dim() - 1)))


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_SGD, OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_training_with_cache_equals_dense_oracle_and_lfu(optimizer, mode):
    """Several steps with two populates (discard policy so the oracle can mirror evictions exactly)."""
    lr, eps, size = 0.2, 1e-6, 4
    emb = _make(cache_size=size, optimizer=optimizer, learning_rate=lr, eps=eps, mode=mode, cache_eviction_policy="discard")
    cores = [nn.Parameter(c.detach().clone()) for c in emb.tt_cores]
    rows: dict[int, nn.Parameter] = {}
    counter: Counter = Counter()
    gen = torch.Generator().manual_seed(1)
    m = 1 if mode == "mean" else 0

    def make_opt(params):
        if optimizer == OptimType.EXACT_SGD:
            return torch.optim.SGD(params, lr=lr)
        if optimizer == OptimType.EXACT_ADAGRAD:
            return torch.optim.Adagrad(params, lr=lr, eps=eps)
        return None

    core_opt = make_opt(cores)
    core_state = [torch.zeros(c.shape[0], dtype=torch.float64) for c in cores]
    row_opt: dict[int, tuple] = {}
    for step in range(6):
        if step in (2, 4):
            emb.cache_populate()
            chosen = _lfu(counter, size)
            table = _tt_table(emb, [c.detach() for c in cores])
            # kept rows keep their trained value and state; new rows come from the cores; evicted rows are dropped
            rows = {i: rows[i] if i in rows else nn.Parameter(table[i].clone()) for i in chosen}
            row_opt = {i: row_opt[i] if i in row_opt else (make_opt([rows[i]]), torch.zeros((), dtype=torch.float64)) for i in chosen}
            assert sorted(_cached(emb)) == chosen
        ids, offsets, weights = _batch(gen, hot=(3, 7, 11, 19, 23, 29) if step < 3 else (40, 41, 42, 7))
        target = torch.randn(offsets.numel() - 1, D, dtype=torch.float64, generator=gen)
        (emb(ids, offsets[:-1], weights) * target).sum().backward()
        counter.update(ids.tolist())
        # oracle
        table = _tt_table(emb, cores)
        if rows:
            idx = torch.tensor(sorted(rows))
            table = table.index_put((idx,), torch.stack([rows[i] for i in sorted(rows)]))
        for prm in [*cores, *rows.values()]:
            prm.grad = None
        (pooled(table, ids, offsets, weights, m) * target).sum().backward()
        _oracle_step(optimizer, lr, eps, cores, core_opt, core_state)
        for i, prm in rows.items():
            if prm.grad is not None:
                opt, state = row_opt[i]
                _oracle_step(optimizer, lr, eps, [prm], opt, [state])
        for c, prm in zip(emb.tt_cores, cores, strict=True):
            torch.testing.assert_close(c.detach(), prm.detach(), rtol=1e-9, atol=1e-11)
        got = _cached(emb)
        assert sorted(got) == sorted(rows)
        for i, prm in rows.items():
            torch.testing.assert_close(got[i], prm.detach(), rtol=1e-9, atol=1e-11)
    assert emb.cache_stats()["hits"] > 0


def test_per_sample_weight_gradients_with_cache():
    emb = _make(mode="mean")
    gen = torch.Generator().manual_seed(2)
    ids, offsets, _ = _batch(gen)
    emb(ids, offsets[:-1])
    emb.cache_populate()
    with torch.no_grad():
        emb.cache.cache_weight.add_(1.0)
    table = _tt_table(emb)
    for i, row in _cached(emb).items():
        table[i] = row
    ids, offsets, weights = _batch(gen, num_bags=6)
    target = torch.randn(6, D, dtype=torch.float64)
    w1 = weights.clone().requires_grad_()
    w2 = weights.clone().requires_grad_()
    (emb(ids, offsets[:-1], w1) * target).sum().backward()
    (pooled(table, ids, offsets, w2, 1) * target).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_auto_populate_interval():
    emb = _make(cache_populate_interval=2)
    for _ in range(2):
        emb(torch.tensor([8, 8, 13]), torch.tensor([0])).sum().backward()
    assert emb.cache_stats()["populates"] == 0
    emb(torch.tensor([8]), torch.tensor([0])).sum().backward()
    stats = emb.cache_stats()
    assert stats["populates"] == 1 and stats["hits"] == 1 and sorted(_cached(emb)) == [8, 13]


# ----------------------------------------------------------------------------- eviction
def test_writeback_keeps_what_an_evicted_row_learned():
    """Fails under ``discard``: after eviction the row served from the cores must be near its trained value."""
    emb = TTEmbeddingBag(
        N, D, [5, 12], [3, 2], [6], sparse=True, use_cache=True, cache_size=2, learning_rate=0.2, dtype=torch.float64
    )
    emb.cache.record(torch.tensor([17, 17, 40]))
    emb.cache_populate()
    for _ in range(5):  # train the cached rows 17 and 40
        (emb(torch.tensor([17, 40]), torch.tensor([0, 1])) * torch.randn(2, D, dtype=torch.float64)).sum().backward()
    learned = _cached(emb)
    before = _tt_table(emb)
    drift = {i: float((before[i] - learned[i]).norm()) for i in learned}
    assert min(drift.values()) > 0.5  # the cached rows learned something the cores do not hold
    emb.cache.record(torch.tensor([2, 5]).repeat_interleave(9))
    emb.cache_populate()  # 2 and 5 are now hotter: 17 and 40 are evicted
    assert sorted(_cached(emb)) == [2, 5]
    after = _tt_table(emb)
    for i, row in learned.items():
        assert float((after[i] - row).norm()) < 0.05 * drift[i], (i, drift[i])
    assert emb.cache_stats()["evictions"] == 2


def test_discard_drops_what_an_evicted_row_learned():
    emb = _make(cache_size=1, learning_rate=0.5, cache_eviction_policy="discard")
    emb(torch.tensor([17]), torch.tensor([0])).sum().backward()
    emb.cache_populate()
    emb(torch.tensor([17]), torch.tensor([0])).sum().backward()
    cores = [c.detach().clone() for c in emb.tt_cores]
    emb.cache.record(torch.tensor([2, 2, 2]))
    emb.cache_populate()
    assert sorted(_cached(emb)) == [2]
    assert all(torch.equal(a, b) for a, b in zip(cores, emb.tt_cores, strict=True))  # cores untouched: 17's update is gone


def test_fit_tt_rows_solves_the_linear_least_squares_exactly():
    p, q, ranks = [4, 5], [2, 3], [1, 3, 1]
    cores = [torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)]
    ids = torch.tensor([1, 7, 12, 18])  # digits (0,1) (1,2) (2,2) (3,3): one row per core-0 slice
    goal = [cores[0] + torch.randn_like(cores[0]), cores[1]]
    targets = dense_table(goal, p, q, ranks, 20)[ids]
    before, after = fit_tt_rows_(cores, ids, targets, p, q, ranks, 20, core_indices=[0], sweeps=1, cg_iters=30)
    assert before > 1.0 and after < 1e-8 * before
    torch.testing.assert_close(dense_table(cores, p, q, ranks, 20)[ids], targets)


def test_cache_flush_empties_the_cache():
    emb = _make(cache_size=3)
    emb(torch.tensor([1, 2, 3, 3]), torch.tensor([0])).sum().backward()
    emb.cache_populate()
    emb.cache_flush()
    assert _cached(emb) == {} and emb.cache_stats()["evictions"] == 3


# ----------------------------------------------------------------------------- counting
def test_hash_table_overflow_is_counted_and_the_smallest_id_wins_a_contested_slot():
    cache = TTRowCache(cache_size=1, embedding_dim=2, hashtbl_size=8, max_probes=1)
    home = cache._home_slots(torch.arange(200))
    a, b = [int(i) for i in torch.nonzero(home == home[0]).squeeze(1)[:2]]  # two ids with one home slot
    cache.record(torch.tensor([b, a, b, b]))
    keys = set(cache.hash_keys[cache.hash_keys != EMPTY_ID].tolist())
    assert keys == {a}
    assert int(cache.hash_counts[home[a]]) == 1 and cache.statistics()["hash_dropped"] == 3


def test_full_hash_table_counts_what_fits_and_drops_the_rest():
    cache = TTRowCache(cache_size=2, embedding_dim=2, hashtbl_size=8, max_probes=8)
    ids = torch.arange(20).repeat_interleave(2)
    cache.record(ids)
    stored = cache.hash_keys[cache.hash_keys != EMPTY_ID]
    assert stored.numel() == 8 and cache.statistics()["hash_dropped"] == 2 * (20 - 8)
    assert torch.all(cache.hash_counts[cache.hash_keys != EMPTY_ID] == 2)


def test_counting_matches_a_counter_and_statistics():
    emb = _make(cache_size=3, hashtbl_size=512)
    counter: Counter = Counter()
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        ids, offsets, _ = _batch(gen)
        emb(ids, offsets[:-1]).sum().backward()
        counter.update(ids.tolist())
    got = _counts(emb.cache)
    assert got == dict(counter)
    emb.cache_populate()
    emb.cache.reset_statistics()
    emb.eval()
    ids, offsets, _ = _batch(gen)
    emb(ids, offsets[:-1])
    cached = set(_cached(emb))
    hits = sum(i in cached for i in ids.tolist())
    stats = emb.cache_stats()
    assert stats["lookups"] == ids.numel() and stats["hits"] == hits
    assert stats["unique_misses"] == len({i for i in ids.tolist() if i not in cached})
    assert stats["hit_rate"] == pytest.approx(hits / ids.numel())
    assert _counts(emb.cache) == got


def test_count_decay_follows_a_popularity_shift():
    # id 7 was hot; then id 3 is, a little less per window. Pure LFU keeps 7 cached for good,
    # halving the counts at every populate lets 3 take its place.
    caches = {d: TTRowCache(cache_size=1, embedding_dim=2, hashtbl_size=64, count_decay=d) for d in (1.0, 0.5)}
    for cache in caches.values():
        cache.record(torch.full((10,), 7))
        cache.populate(lambda ids: torch.zeros(ids.numel(), 2), None)
        for _ in range(3):
            cache.record(torch.full((3,), 3))
            cache.populate(lambda ids: torch.zeros(ids.numel(), 2), None)
    assert caches[1.0].cache_ids.tolist() == [7] and _counts(caches[1.0]) == {7: 10, 3: 9}
    assert caches[0.5].cache_ids.tolist() == [3]
    # after each populate, 7: 10 -> 5 -> 2 -> 1 -> 0 (gone from the table); 3: 3 -> 1, 4 -> 2, 5 -> 2
    assert _counts(caches[0.5]) == {3: 2}


def test_count_decay_rebuild_frees_slots_and_keeps_probe_runs_valid():
    cache = TTRowCache(cache_size=2, embedding_dim=2, hashtbl_size=8, max_probes=8, count_decay=0.5)
    cache.record(torch.arange(8).repeat_interleave(torch.tensor([1, 1, 1, 1, 4, 4, 4, 4])))  # a full table
    assert len(_counts(cache)) == 8
    cache.record(torch.tensor([20]))  # no room
    assert cache.statistics()["hash_dropped"] == 1
    cache.populate(lambda ids: torch.zeros(ids.numel(), 2), None)
    assert _counts(cache) == {4: 2, 5: 2, 6: 2, 7: 2}  # the ids counted once decayed to 0 and left
    cache.record(torch.tensor([20, 21, 20, 5]))  # room again; the survivors are still found by probing
    assert _counts(cache) == {4: 2, 5: 3, 6: 2, 7: 2, 20: 2, 21: 1}
    assert cache.statistics()["hash_dropped"] == 1
    zero = TTRowCache(cache_size=2, embedding_dim=2, hashtbl_size=8, count_decay=0.0)
    zero.record(torch.tensor([1, 1, 2]))
    zero.populate(lambda ids: torch.zeros(ids.numel(), 2), None)
    assert zero.cache_ids.tolist() == [1, 2] and _counts(zero) == {}  # counts restart after each populate


def test_count_decay_reaches_the_cache_from_the_module_and_the_configs():
    from torchrec_tt.modules.tt_embedding_configs import TTEmbeddingBagConfig
    from torchrec_tt.training.config import ModelConfig

    assert _make(cache_count_decay=0.25).cache.count_decay == 0.25
    assert "count_decay=0.25" in repr(_make(cache_count_decay=0.25).cache)
    with pytest.raises(ValueError, match="'c'.*count_decay must be in \\[0, 1\\], got 1.5"):
        _make(cache_count_decay=1.5, name="c")
    with pytest.raises(ValueError, match="'t0': cache_count_decay must be in \\[0, 1\\]"):
        TTEmbeddingBagConfig(name="t0", num_embeddings=100, embedding_dim=4, feature_names=["f"], tt_ranks=[2, 2],
                             use_cache=True, cache_size=4, cache_count_decay=-0.1)
    with pytest.raises(ValueError, match="tt_cache_count_decay must be in"):
        ModelConfig(tt_cache_count_decay=2.0)


# ----------------------------------------------------------------------------- state
def test_checkpoint_round_trip_mid_training_gives_identical_next_steps():
    emb = _make(optimizer=OptimType.EXACT_ADAGRAD, cache_populate_interval=2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids, offsets, w = _batch(gen)
        emb(ids, offsets[:-1], w).sum().backward()
    restored = _make(optimizer=OptimType.EXACT_ADAGRAD, cache_populate_interval=2)
    restored.load_state_dict(copy.deepcopy(emb.state_dict()))
    for _ in range(4):
        ids, offsets, w = _batch(gen)
        target = torch.randn(offsets.numel() - 1, D, dtype=torch.float64, generator=gen)
        a = emb(ids, offsets[:-1], w)
        b = restored(ids, offsets[:-1], w)
        assert torch.equal(a, b)
        (a * target).sum().backward()
        (b * target).sum().backward()
    for (k, x), (_, y) in zip(emb.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def test_cache_free_checkpoint_loads_with_an_empty_cache_and_the_reverse_is_refused():
    plain = _make(use_cache=False)
    cached = _make()
    cached.load_state_dict(plain.state_dict())
    assert _cached(cached) == {}
    torch.testing.assert_close(cached.full_weight(), plain.full_weight())
    cached(torch.tensor([3]), torch.tensor([0])).sum().backward()
    cached.cache_populate()
    with pytest.raises(RuntimeError, match="use_cache=False.*cache_flush"):
        plain.load_state_dict(cached.state_dict())


def test_mismatched_cache_checkpoint_is_refused_and_nothing_loaded():
    small, big = _make(cache_size=3), _make(cache_size=4)
    cores = [c.detach().clone() for c in big.tt_cores]
    with pytest.raises(RuntimeError, match="TTEmbeddingBag.*cache.cache_ids.*nothing was loaded"):
        big.load_state_dict(small.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(cores, big.tt_cores, strict=True))


# ----------------------------------------------------------------------------- errors
def test_bad_input_is_refused_before_anything_is_counted():
    emb = _make()
    with pytest.raises(IndexError, match="TTEmbeddingBag.*out of range"):
        emb(torch.tensor([1, N]), torch.tensor([0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        emb(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]))
    assert emb.cache_stats()["lookups"] == 0 and int(emb.cache.hash_counts.sum()) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparse": False}, "needs sparse=True"),
        ({"cache_size": 0}, "cache_size > 0"),
        ({"hashtbl_size": 2}, "hashtbl_size must be"),
        ({"cache_eviction_policy": "lru"}, "eviction policy"),
    ],
)
def test_bad_cache_arguments_name_the_table(kwargs, match):
    with pytest.raises(ValueError, match=f"'cached_t'.*{match}|{match}.*'cached_t'|'cached_t'"):
        _make(name="cached_t", **kwargs)


def test_cache_methods_without_a_cache_raise():
    with pytest.raises(RuntimeError, match="use_cache=False"):
        _make(use_cache=False).cache_populate()


def test_record_op_passes_opcheck():
    from torchrec_tt.ops import lfu_cache_record_

    keys = torch.full((16,), EMPTY_ID)
    counts = torch.zeros(16, dtype=torch.long)
    ids = torch.tensor([3, 3, 5, 19, 35, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.torchrec_tt.lfu_cache_record_.default, (keys.clone(), counts.clone(), ids, 4))
    dropped = lfu_cache_record_(keys, counts, ids, 4)
    assert dropped.tolist() == [0] and int(counts.sum()) == 6 and int(counts[keys == 3]) == 3


def test_row_cache_with_no_optimizer_refuses_training():
    cache = TTRowCache(cache_size=1, embedding_dim=2, optimizer=None)
    with pytest.raises(RuntimeError, match="no fused optimizer"):
        cache.update_hits_(torch.ones(1, 2), torch.tensor([0]), torch.tensor([0, 1]), None, 0, 0.1, 0.0, torch.float32)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", [OptimType.EXACT_SGD, OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD])
def test_cuda_cache_matches_cpu_and_is_deterministic(optimizer):
    """Same training sequence on CPU and CUDA: same counts, cache contents, outputs; CUDA bitwise repeatable.

    The hash-table layout may differ (CUDA claims contested slots by atomic CAS), so the tables are
    compared as id -> count maps, and the layout-dependent state is left out of the bitwise check.
    """

    def run(device):
        torch.manual_seed(0)
        emb = TTEmbeddingBag(
            5000, 16, [10, 20, 25], [2, 4, 2], [8, 8], sparse=True, optimizer=optimizer, learning_rate=0.05,
            use_cache=True, cache_size=64, hashtbl_size=16384, mode="mean", dtype=torch.float64,
            cache_populate_interval=3,
        ).to(device)  # initialised on the CPU: same values on both devices
        gen = torch.Generator().manual_seed(4)
        outs = []
        for _ in range(8):
            ids = (torch.rand(3000, generator=gen).pow(4) * 5000).long()  # skewed
            offsets = torch.arange(0, 3000, 30)
            w = torch.rand(3000, generator=gen, dtype=torch.float64)
            g = torch.randn(100, 16, generator=gen, dtype=torch.float64)
            out = emb(ids.to(device), offsets.to(device), w.to(device))
            out.backward(g.to(device))
            outs.append(out.detach().cpu())
        state = {k: v.detach().cpu() for k, v in emb.state_dict().items()}
        return outs, state

    cpu_outs, cpu_state = run("cpu")
    gpu_outs, gpu_state = run("cuda")
    again_outs, again_state = run("cuda")
    for a, b in zip(cpu_outs, gpu_outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    def counts(state):
        keys, cnt = state["cache.hash_keys"].tolist(), state["cache.hash_counts"].tolist()
        return {k: c for k, c in zip(keys, cnt, strict=True) if k != EMPTY_ID}

    assert counts(gpu_state) == counts(cpu_state) == counts(again_state)
    layout = ("cache.hash_keys", "cache.hash_counts")
    for key in ("cache.cache_ids", "cache.stats"):
        assert torch.equal(gpu_state[key], cpu_state[key]), key
    for key in cpu_state:
        if key in layout:
            continue
        torch.testing.assert_close(gpu_state[key], cpu_state[key], rtol=1e-9, atol=1e-10)
        assert torch.equal(again_state[key], gpu_state[key]), key
    assert all(torch.equal(a, b) for a, b in zip(gpu_outs, again_outs, strict=True))
    assert cpu_state["cache.stats"][1] > 0  # hits happened


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cached_training_step_never_syncs_with_the_host():
    emb = TTEmbeddingBag(
        5000, 16, [10, 20, 25], [2, 4, 2], [8, 8], sparse=True, optimizer=OptimType.EXACT_ADAGRAD,
        use_cache=True, cache_size=64, device="cuda",
    )
    ids = (torch.rand(3000, device="cuda").pow(4) * 5000).long()
    offsets = torch.arange(0, 3000, 30, device="cuda")
    emb(ids, offsets).sum().backward()
    emb.cache_populate()
    grad = torch.randn(100, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            emb(ids, offsets).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert emb.cache_stats()["hits"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_count_decay_matches_cpu():
    def run(device):
        # a table with room for every id: CUDA's slot claims (atomic CAS) may differ from the CPU's
        cache = TTRowCache(cache_size=4, embedding_dim=2, hashtbl_size=4096, count_decay=0.5, device=device)
        gen = torch.Generator().manual_seed(2)
        for step in range(6):
            ids = (torch.rand(200, generator=gen).pow(3) * (40 + 10 * step)).long()  # a drifting head
            cache.record(ids.to(device))
            cache.populate(lambda i: torch.zeros(i.numel(), 2, device=device), None)
        return cache.cache_ids.cpu().tolist(), _counts(cache), int(cache.stats[4])

    cpu = run("cpu")
    assert cpu[2] == 0 and run("cuda") == cpu


# ----------------------------------------------------------------------------- the cached ops
def _op_case():
    cores = [torch.randn(5, 1 * 3 * 3, dtype=torch.float64), torch.randn(4, 3 * 1 * 2, dtype=torch.float64),
             torch.randn(3, 2 * 2 * 1, dtype=torch.float64)]
    shape = ([5, 4, 3], [3, 1, 2], [1, 3, 2, 1], N)
    ids, offsets = torch.tensor([3, 7, 7, 50, 3, 11]), torch.tensor([0, 2, 2, 6])
    cache_ids, cache_weight = torch.tensor([3, 11, EMPTY_ID]), torch.randn(3, D, dtype=torch.float64)
    return cores, shape, ids, offsets, cache_ids, cache_weight


def _counters(slots=16):
    """(hash_keys, hash_counts, stats) of an empty frequency table."""
    return torch.full((slots,), EMPTY_ID), torch.zeros(slots, dtype=torch.long), torch.zeros(6, dtype=torch.long)


def test_cached_ops_pass_opcheck():
    cores, shape, ids, offsets, cache_ids, cache_weight = _op_case()
    w = torch.rand(ids.numel(), dtype=torch.float64)
    for count in (False, True):
        torch.library.opcheck(
            torch.ops.torchrec_tt.tt_cached_embedding_bag_forward.default,
            (cores, cache_ids, cache_weight, *_counters(), ids, offsets, w, *shape, 1, 4, count),
        )
    states = [torch.rand(c.shape[0], dtype=torch.float64) for c in cores]
    torch.library.opcheck(
        torch.ops.torchrec_tt.tt_cached_embedding_bag_backward_fused_.default,
        (torch.randn(3, D, dtype=torch.float64), [c.clone() for c in cores], states, cache_ids, cache_weight.clone(),
         [torch.rand(3, dtype=torch.float64)], ids, offsets, w, *shape, 1, 2, 0.1, 1e-8),
    )


def test_cached_forward_op_against_dense_oracle():
    from torchrec_tt.ops import tt_cached_embedding_bag

    cores, shape, ids, offsets, cache_ids, cache_weight = _op_case()
    table = dense_table(cores, *shape)
    table[3], table[11] = cache_weight[0], cache_weight[1]
    w = torch.rand(ids.numel(), dtype=torch.float64)
    keys, counts, stats = _counters()
    for step in (1, 2):
        out = tt_cached_embedding_bag(
            cores, cache_ids, cache_weight, keys, counts, stats, ids, offsets, w, *shape, 1, count=True
        )
        torch.testing.assert_close(out, pooled(table, ids, offsets, w, 1))
        # lookups 6; hits 3, 3, 11; TT ids 7, 50; nothing evicted or dropped, no populate
        assert stats.tolist() == [6 * step, 3 * step, 2 * step, 0, 0, 0]
        stored = {k: c for k, c in zip(keys.tolist(), counts.tolist(), strict=True) if k != EMPTY_ID}
        assert stored == {3: 2 * step, 7: 2 * step, 50: step, 11: step}
    tt_cached_embedding_bag(cores, cache_ids, cache_weight, keys, counts, stats, ids, offsets, w, *shape, 1, count=False)
    assert stats.tolist() == [18, 9, 6, 0, 0, 0] and int(counts.sum()) == 12  # an eval lookup counts no access


def test_cached_forward_op_counts_what_a_full_hash_table_drops():
    from torchrec_tt.ops import tt_cached_embedding_bag

    cores, shape, ids, offsets, cache_ids, cache_weight = _op_case()
    keys, counts, stats = _counters(slots=1)  # one slot, one probe: the first id to claim it is counted
    tt_cached_embedding_bag(cores, cache_ids, cache_weight, keys, counts, stats, ids, offsets, None, *shape, 0, 1, True)
    kept = int(keys[0])
    assert int(counts[0]) == int((ids == kept).sum())
    assert int(stats[4]) == ids.numel() - int(counts[0])  # every other occurrence counted as dropped


def test_cached_forward_op_rejects_bad_counters():
    from torchrec_tt.ops import tt_cached_embedding_bag

    cores, shape, ids, offsets, cache_ids, cache_weight = _op_case()
    keys, counts, _ = _counters()
    with pytest.raises(ValueError, match="stats must be a 1-D int64 tensor of >= 5"):
        tt_cached_embedding_bag(
            cores, cache_ids, cache_weight, keys, counts, torch.zeros(2, dtype=torch.long), ids, offsets, None, *shape
        )
    with pytest.raises(ValueError, match="hash_keys and hash_counts"):
        tt_cached_embedding_bag(cores, cache_ids, cache_weight, keys, counts[:3], _counters()[2], ids, offsets, None, *shape)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: (c[0].flip(0), c[1]), "sorted"),
        (lambda c: (c[0], c[1][:, :4]), r"cache_weight must be \(3, 6\)"),
        (lambda c: (c[0].int(), c[1]), "int64"),
        (lambda c: (c[0], c[1].float()), "must match the cores"),
    ],
    ids=["unsorted", "shape", "dtype", "weight-dtype"],
)
def test_cached_ops_reject_a_bad_cache(change, match):
    from torchrec_tt.ops import tt_cached_embedding_bag, tt_cached_embedding_bag_backward_fused_

    cores, shape, ids, offsets, cache_ids, cache_weight = _op_case()
    bad_ids, bad_weight = change((cache_ids, cache_weight))
    with pytest.raises(ValueError, match=match):
        tt_cached_embedding_bag(cores, bad_ids, bad_weight, *_counters(), ids, offsets, None, *shape, 0)
    before = [c.clone() for c in cores]
    with pytest.raises(ValueError, match=match):
        tt_cached_embedding_bag_backward_fused_(
            torch.ones(3, D, dtype=torch.float64), cores, [], bad_ids, bad_weight, [], ids, offsets, None, *shape, 0, 0, 0.1, 0.0
        )
    assert all(torch.equal(a, b) for a, b in zip(cores, before, strict=True))  # nothing half-applied
