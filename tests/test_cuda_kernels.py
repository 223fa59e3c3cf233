"""The CUDA kernels (csrc/tt_embedding_bag/tt_embedding_bag_cuda.cu), on a GPU.

Every test is marked ``gpu`` and skipped without CUDA or without the compiled
CUDA kernels. The oracle is the pure-PyTorch reference (``torchrec_tt.ops.reference``)
run in float64 on the CPU; on top of it:

* random shapes (2..5 cores, ``num_embeddings < prod(p)``, ``p_k > r*q*r``), empty
  bags, duplicates in and across bags, int32 and int64 ids and offsets, weights,
  sum and mean, float64 / float32 / half / bfloat16 cores;
* long runs of one digit (slice-gradient reductions spanning many blocks) and
  Zipf-skewed ids;
* the fused optimizers (SGD, Adagrad, row-wise Adagrad) against the reference step;
* bitwise determinism (same inputs twice -> same bits);
* the fast kernels with and without tensor cores (``TORCHREC_TT_CUDA_MMA=0`` and ``=1``
  in subprocesses), and the backward's one-pass TF32 products under
  ``torch.set_float32_matmul_precision("high")`` (elementwise within the TF32 error bound of the
  float64 oracle, different from the fp32-accurate results, deterministic);
* the one-launch sort of batches up to 64 tiles at the tile edges, and cub's sort path
  (``TORCHREC_TT_CUDA_GRID_SORT=0``, in a subprocess) giving the same bits;
* a training step (forward + backward with the fused optimizer) captured in a
  CUDA graph and replayed, bitwise equal to eager steps (so no host sync; captured
  lookups take cub's sort path, eager ones the one-launch sort);
* ids validated on the device (a bad id aborts with a device-side assert, in a
  subprocess since that poisons the CUDA context);
* outputs past 2^31 elements (int64 offsets of ``nnz * D``).

Run on the GPU machine: ``scripts/gpu_run.sh`` (or ``pytest -m gpu``).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from cuda_graph_replay import assert_graph_replay_matches_eager

import torchrec_tt
from torchrec_tt.ops import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not torchrec_tt.HAS_CUDA_KERNELS, reason="torchrec_tt._C built without the CUDA kernels"),
]

tt = torch.ops.torchrec_tt
DEV = "cuda"

# (p, q, ranks, num_embeddings); each has a core with p_k > r_k*q_k*r_{k+1}.
SHAPES = [
    ([37], [6], [1, 1], 30),  # one core
    ([13, 5], [2, 3], [1, 3, 1], 60),  # core 0: 13 > 6
    ([3, 4, 7], [2, 3, 2], [1, 3, 2, 1], 80),  # core 2: 7 > 4
    ([20, 22, 25], [4, 4, 4], [1, 8, 8, 1], 10_000),  # seed-like, ranks 8
    ([6, 7, 9], [4, 4, 4], [1, 32, 32, 1], 370),  # seed q and ranks: the fast warp kernels (float32)
    ([2, 3, 2, 9], [2, 1, 2, 2], [1, 2, 3, 2, 1], 100),
    ([2, 2, 3, 2, 5], [1, 2, 2, 1, 2], [1, 2, 2, 3, 2, 1], 110),
    # generic kernels; core 2 (r = 32, n = 128) has its T^T dT sums on tensor cores, T a product
    ([3, 4, 5, 70], [2, 4, 4, 2], [1, 16, 32, 32, 1], 4000),
]
LENGTHS = [0, 3, 1, 0, 5, 2, 0, 4, 0, 20, 1, 7]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_cores(p, q, ranks, dtype=torch.float64, device="cpu", scale=0.5):
    return [
        scale * torch.randn(p[k], ranks[k] * q[k] * ranks[k + 1], dtype=dtype, device=device) for k in range(len(p))
    ]


def make_bags(n, lengths, index_dtype=torch.int64, dup=True):
    total = sum(lengths)
    if dup:
        pool = torch.randint(0, n, (max(total // 3, 1),))
        ids = pool[torch.randint(0, pool.numel(), (total,))]
    else:
        ids = torch.randint(0, n, (total,))
    if total:
        ids[0] = n - 1
    offsets = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()])
    return ids.to(index_dtype), offsets.to(index_dtype)


def zipf_ids(n, size, alpha=1.2):
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    probs = ranks.pow(-alpha)
    return torch.multinomial(probs / probs.sum(), size, replacement=True)


def to_dev(cores, dtype):
    return [c.to(DEV, dtype).contiguous() for c in cores]


def tol(dtype):
    return {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


# --------------------------------------------------------------------------- registration
def test_cuda_kernels_registered():
    for op in (
        "tt_embedding_bag_forward",
        "tt_embedding_bag_backward",
        "tt_embedding_bag_backward_fused_",
        "tt_lookup_rows",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchrec_tt::{op}", "CUDA"), op


# --------------------------------------------------------------------------- forward / lookup
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{len(s[0])}-p{s[0]}")
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_matches_reference(shape, index_dtype, mode, weighted):
    p, q, ranks, n = shape
    cores = make_cores(p, q, ranks)
    ids, offsets = make_bags(n, LENGTHS, index_dtype)
    w = torch.rand(ids.numel(), dtype=torch.float64) if weighted else None
    ref = reference.tt_embedding_bag_forward(cores, ids, offsets, w, p, q, ranks, n, mode)
    for dtype in (torch.float64, torch.float32):
        out = tt.tt_embedding_bag_forward(
            to_dev(cores, dtype),
            ids.to(DEV),
            offsets.to(DEV),
            None if w is None else w.to(DEV, dtype),
            p,
            q,
            ranks,
            n,
            mode,
        )
        assert out.dtype == dtype and out.shape == ref.shape
        assert rel_err(out, ref) < tol(dtype), dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_low_precision(dtype):
    p, q, ranks, n = SHAPES[3]
    cores = [c.to(dtype).double() for c in make_cores(p, q, ranks)]  # representable inputs
    ids, offsets = make_bags(n, LENGTHS)
    ref = reference.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, n, 0)
    out = tt.tt_embedding_bag_forward(to_dev(cores, dtype), ids.to(DEV), offsets.to(DEV), None, p, q, ranks, n, 0)
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{len(s[0])}-p{s[0]}")
def test_lookup_rows_matches_reference(shape):
    p, q, ranks, n = shape
    cores = make_cores(p, q, ranks)
    ids = torch.cat([torch.arange(n), torch.randint(0, n, (300,))])
    ref = reference.tt_lookup_rows(cores, ids, p, q, ranks, n)
    for dtype in (torch.float64, torch.float32):
        out = tt.tt_lookup_rows(to_dev(cores, dtype), ids.to(DEV, torch.int32), p, q, ranks, n)
        assert rel_err(out, ref) < tol(dtype)
    empty = tt.tt_lookup_rows(to_dev(cores, torch.float32), ids[:0].to(DEV), p, q, ranks, n)
    assert empty.shape == (0, math.prod(q))


def test_empty_batch_and_all_empty_bags():
    p, q, ranks, n = SHAPES[2]
    cores = to_dev(make_cores(p, q, ranks), torch.float32)
    ids = torch.zeros(0, dtype=torch.long, device=DEV)
    offsets = torch.zeros(5, dtype=torch.long, device=DEV)
    out = tt.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, n, 1)
    assert out.shape == (4, math.prod(q)) and not out.any()
    grads = tt.tt_embedding_bag_backward(
        torch.randn(4, math.prod(q), device=DEV), cores, ids, offsets, None, p, q, ranks, n, 0
    )
    assert all(not g.any() for g in grads)
    before = [c.clone() for c in cores]
    tt.tt_embedding_bag_backward_fused_(
        torch.randn(4, math.prod(q), device=DEV), cores, [], ids, offsets, None, p, q, ranks, n, 0, 0, 0.1, 0.0
    )
    assert all(torch.equal(a, b) for a, b in zip(before, cores, strict=True))
    out = tt.tt_embedding_bag_forward(cores, ids, torch.zeros(1, dtype=torch.long, device=DEV), None, p, q, ranks, n, 0)
    assert out.shape == (0, math.prod(q))


# --------------------------------------------------------------------------- backward
def _grad_case(shape, index_dtype=torch.int64, lengths=LENGTHS, ids=None, offsets=None, weighted=True, mode=0):
    p, q, ranks, n = shape
    cores = make_cores(p, q, ranks)
    if ids is None:
        ids, offsets = make_bags(n, lengths, index_dtype)
    w = torch.rand(ids.numel(), dtype=torch.float64) + 0.5 if weighted else None
    g = torch.randn(offsets.numel() - 1, math.prod(q), dtype=torch.float64)
    return p, q, ranks, n, cores, ids, offsets, w, g, mode


def _check_backward(case, dtypes=(torch.float64, torch.float32)):
    p, q, ranks, n, cores, ids, offsets, w, g, mode = case
    ref = reference.tt_embedding_bag_backward(g, cores, ids, offsets, w, p, q, ranks, n, mode)
    for dtype in dtypes:
        grads = tt.tt_embedding_bag_backward(
            g.to(DEV, dtype),
            to_dev(cores, dtype),
            ids.to(DEV),
            offsets.to(DEV),
            None if w is None else w.to(DEV, dtype),
            p,
            q,
            ranks,
            n,
            mode,
        )
        for k, (a, b) in enumerate(zip(grads, ref, strict=True)):
            assert a.dtype == dtype and a.shape == b.shape
            assert rel_err(a, b) < 10 * tol(dtype), (dtype, k)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{len(s[0])}-p{s[0]}")
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("mode", [0, 1])
def test_backward_matches_reference(shape, index_dtype, mode):
    _check_backward(_grad_case(shape, index_dtype, mode=mode))


LONG_RUN_SHAPES = [
    ([3, 200, 5], [2, 2, 2], [1, 3, 3, 1], 3000),  # few digits of cores 0 and 2: long runs
    ([200, 3, 5], [2, 2, 2], [1, 3, 3, 1], 3000),  # few digits of core 1 (the grouped one)
    ([2, 500], [4, 2], [1, 4, 1], 1000),
    ([4000], [8], [1, 1], 4000),
    ([3, 40, 5], [4, 4, 4], [1, 32, 32, 1], 600),  # fast path, long runs
]
# Fast path with up to 64 distinct rows per item (6 prefixes, 200 last digits): the fast kernels
# stage an item's rows in several chunks of 8 and its positions' gradient rows 16 at a time.
MANY_ROWS_FAST = ([2, 3, 200], [4, 4, 4], [1, 32, 32, 1], 1200)
# Fast path with ~200 items per digit of core 1: its runs cross reduction chunks, so the tail
# kernel sums their 16 KB partials (split over several blocks, except row-wise Adagrad).
LONG_CORE1_FAST = ([200, 3, 5], [4, 4, 4], [1, 32, 32, 1], 3000)
LONG_RUN_SHAPES += [MANY_ROWS_FAST, LONG_CORE1_FAST]


def _skewed_bags(n, nnz, num_bags, dist):
    ids = torch.randint(0, n, (nnz,)) if dist == "uniform" else zipf_ids(n, nnz)
    cuts = torch.sort(torch.randint(0, nnz + 1, (num_bags - 1,))).values
    return ids, torch.cat([torch.tensor([0]), cuts, torch.tensor([nnz])])


@pytest.mark.parametrize("shape", LONG_RUN_SHAPES, ids=lambda s: f"p{s[0]}")
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_backward_long_runs_and_skew(shape, dist):
    ids, offsets = _skewed_bags(shape[3], 6000, 400, dist)
    _check_backward(_grad_case(shape, ids=ids, offsets=offsets))


# The backward sorts items (unique rows) by a core's digit in counting passes of 8 bits over
# tiles of 512: p_0 = 300 (two passes, ~24 tiles of items), p = 70000 (three passes, ~35
# tiles of rows), p_2 = 256 (the sentinel 256 needs a second pass).
DIGIT_SORT_SHAPES = [
    ([300, 40, 3], [2, 2, 2], [1, 3, 3, 1], 36000),
    ([70000], [2], [1, 1], 70000),
    ([5, 4, 256], [2, 2, 2], [1, 2, 2, 1], 5120),
]


@pytest.mark.parametrize("shape", DIGIT_SORT_SHAPES, ids=lambda s: f"p{s[0]}")
def test_backward_digit_sort_passes(shape):
    ids, offsets = _skewed_bags(shape[3], 20000, 500, "uniform")
    _check_backward(_grad_case(shape, ids=ids, offsets=offsets))


# Step 2's sort of (key, position) in one cooperative launch covers batches of up to 64
# tiles of 2048 ids (tt_cuda_grid_sort.cuh); larger ones take cub's sort. Sizes at the tile
# edges and on both sides of the limit, keys of 6, 17 and 25 bits (1, 3 and 4 passes).
SORT_SHAPES = [
    ([37], [6], [1, 1], 30),
    ([40, 50, 60], [2, 2, 2], [1, 2, 3, 1], 120_000),
    ([300, 300, 300], [2, 2, 2], [1, 2, 2, 1], 27_000_000),
]


@pytest.mark.parametrize("nnz", [1, 2047, 2048, 2049, 64 * 2048, 64 * 2048 + 1])
@pytest.mark.parametrize("shape", SORT_SHAPES, ids=lambda s: f"p{s[0]}")
def test_sort_sizes_around_tiles(shape, nnz):
    p, q, ranks, n = shape
    # skewed (runs of equal keys across tiles) over the whole key range
    ids = zipf_ids(min(n, 50_000), nnz) * (n // min(n, 50_000)) if nnz > 4096 else torch.randint(0, n, (nnz,))
    offsets = torch.tensor([0, *sorted(torch.randint(0, nnz + 1, (30,)).tolist()), nnz])
    case = _grad_case(shape, ids=ids, offsets=offsets)
    cores, w = case[4], case[7]  # (p, q, ranks, n, cores, ids, offsets, w, g, mode)
    ref = reference.tt_embedding_bag_forward(cores, ids, offsets, w, p, q, ranks, n, 0)
    out = tt.tt_embedding_bag_forward(
        to_dev(cores, torch.float64), ids.to(DEV), offsets.to(DEV), w.to(DEV), p, q, ranks, n, 0
    )
    assert rel_err(out, ref) < tol(torch.float64)
    _check_backward(case, dtypes=(torch.float64,))


@pytest.mark.parametrize("dist", ["uniform", "zipf"])
@pytest.mark.parametrize("mode", [0, 1])
def test_forward_many_rows_per_item(dist, mode):
    p, q, ranks, n = MANY_ROWS_FAST
    ids, offsets = _skewed_bags(n, 6000, 300, dist)
    cores = make_cores(p, q, ranks)
    w = torch.rand(ids.numel(), dtype=torch.float64) + 0.5
    ref = reference.tt_embedding_bag_forward(cores, ids, offsets, w, p, q, ranks, n, mode)
    out = tt.tt_embedding_bag_forward(
        to_dev(cores, torch.float32), ids.to(DEV), offsets.to(DEV), w.to(DEV, torch.float32), p, q, ranks, n, mode
    )
    assert rel_err(out, ref) < tol(torch.float32)


@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4]], ids=lambda s: f"p{s[0]}")
def test_backward_one_hot_id(shape):
    # Every lookup is the same row: one urow split into many items / chunks.
    ids = torch.full((5000,), shape[3] - 7)
    offsets = torch.arange(0, 5001, 5)
    _check_backward(_grad_case(shape, ids=ids, offsets=offsets))


# --------------------------------------------------------------------------- fused optimizers
@pytest.mark.parametrize(
    "shape",
    [SHAPES[1], SHAPES[2], SHAPES[3], SHAPES[4], SHAPES[5], LONG_RUN_SHAPES[0], MANY_ROWS_FAST, LONG_CORE1_FAST],
    ids=lambda s: f"p{s[0]}",
)
@pytest.mark.parametrize("optimizer", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_matches_reference(shape, optimizer, dtype):
    p, q, ranks, n = shape
    cores = make_cores(p, q, ranks)
    nnz, num_bags = 900, 60
    ids = zipf_ids(n, nnz)
    cuts = torch.sort(torch.randint(0, nnz + 1, (num_bags - 1,))).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([nnz])])
    w = torch.rand(nnz, dtype=torch.float64) + 0.5
    g = torch.randn(num_bags, math.prod(q), dtype=torch.float64)
    if optimizer == 0:
        state = []
    elif optimizer == 1:
        state = [torch.rand_like(c) + 0.1 for c in cores]
    else:
        state = [torch.rand(c.shape[0], dtype=torch.float64) + 0.1 for c in cores]
    ref_cores = [c.clone() for c in cores]
    ref_state = [s.clone() for s in state]
    reference.tt_embedding_bag_backward_fused_(
        g, ref_cores, ref_state, ids, offsets, w, p, q, ranks, n, 1, optimizer, 0.05, 1e-8
    )
    dev_cores = to_dev(cores, dtype)
    dev_state = [s.to(DEV, torch.float32 if dtype != torch.float64 else dtype) for s in state]
    tt.tt_embedding_bag_backward_fused_(
        g.to(DEV, dtype),
        dev_cores,
        dev_state,
        ids.to(DEV, torch.int32),
        offsets.to(DEV),
        w.to(DEV, dtype),
        p,
        q,
        ranks,
        n,
        1,
        optimizer,
        0.05,
        1e-8,
    )
    for k in range(len(p)):
        delta_ref = ref_cores[k] - cores[k]
        delta = dev_cores[k].double().cpu() - cores[k]
        assert rel_err(delta, delta_ref) < (1e-9 if dtype == torch.float64 else 1e-3), k
        if state:
            assert rel_err(dev_state[k], ref_state[k]) < 10 * tol(dtype), k
        untouched = delta_ref.abs().sum(dim=tuple(range(1, delta_ref.dim()))) == 0
        assert torch.equal(dev_cores[k].cpu()[untouched].double(), cores[k].to(dtype)[untouched].double())


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("rank", [16, 32], ids=["generic", "fast"])
def test_bitwise_deterministic(rank):
    p, q, ranks, n = [200, 220, 250], [4, 4, 4], [1, rank, rank, 1], 11_000_000
    cores = to_dev(make_cores(p, q, ranks, torch.float32), torch.float32)
    ids = zipf_ids(200_000, 40_000).to(DEV) * 37 % n
    offsets = torch.arange(0, 40_001, 20, device=DEV)
    g = torch.randn(2000, 64, device=DEV)
    out1 = tt.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, n, 0)
    out2 = tt.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, n, 0)
    assert torch.equal(out1, out2)
    g1 = tt.tt_embedding_bag_backward(g, cores, ids, offsets, None, p, q, ranks, n, 0)
    g2 = tt.tt_embedding_bag_backward(g, cores, ids, offsets, None, p, q, ranks, n, 0)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    results = []
    for _ in range(2):
        c = [x.clone() for x in cores]
        s = [torch.zeros_like(x) for x in cores]
        tt.tt_embedding_bag_backward_fused_(g, c, s, ids, offsets, None, p, q, ranks, n, 0, 1, 0.1, 1e-10)
        results.append(c + s)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


# --------------------------------------------------------------------------- CUDA graph
def _make_table(p, q, ranks, n):
    try:
        from torchrec_tt import TTEmbeddingBag  # noqa: PLC0415
        from torchrec_tt.modules.optim_types import OptimType  # noqa: PLC0415
    except ImportError:
        return None
    torch.manual_seed(1)
    return TTEmbeddingBag(
        n,
        math.prod(q),
        p,
        q,
        ranks[1:-1],
        sparse=True,
        optimizer=OptimType.EXACT_ADAGRAD,
        learning_rate=0.05,
        device=DEV,
    )


@pytest.mark.parametrize(
    "shape",
    [([50, 60, 70], [4, 4, 2], [1, 8, 8, 1], 200_000), ([50, 60, 70], [4, 4, 4], [1, 32, 32, 1], 200_000)],
    ids=["generic", "fast"],
)
def test_cuda_graph_training_step(shape):
    p, q, ranks, n = shape
    num_bags, bag = 256, 10
    ids_all = [torch.randint(0, n, (num_bags * bag,), device=DEV) for _ in range(4)]
    offsets = torch.arange(0, num_bags * bag + 1, bag, device=DEV)
    target = torch.randn(num_bags, math.prod(q), device=DEV)
    table = _make_table(p, q, ranks, n)

    if table is not None:  # through the module: forward + loss.backward() (fused Adagrad inside)
        twin = _make_table(p, q, ranks, n)
        twin.load_state_dict(table.state_dict())

        def step(module, ids):
            out = module(ids, offsets[:-1])
            loss = (out - target).pow(2).sum()
            loss.backward()
            return loss

        params = lambda m: [c.detach() for c in m.tt_cores] + m.optimizer_states()  # noqa: E731
    else:  # through the ops
        cores = to_dev(make_cores(p, q, ranks, scale=0.3), torch.float32)
        state = [torch.zeros_like(c) for c in cores]
        table = (cores, state)
        twin = ([c.clone() for c in cores], [s.clone() for s in state])

        def step(m, ids):
            c, s = m
            out = tt.tt_embedding_bag_forward(c, ids, offsets, None, p, q, ranks, n, 0)
            grad = 2 * (out - target)
            tt.tt_embedding_bag_backward_fused_(grad, c, s, ids, offsets, None, p, q, ranks, n, 0, 1, 0.05, 1e-10)
            return grad.sum()

        params = lambda m: m[0] + m[1]  # noqa: E731

    start_core = params(table)[0].clone()
    assert_graph_replay_matches_eager(step, table, twin, params, ids_all)
    assert not torch.equal(params(table)[0], start_core)


def _kernel_launches(prof, name: str) -> int:
    return sum(e.count for e in prof.key_averages() if name in e.key and "cuda" in str(e.device_type).lower())


@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4]], ids=["generic", "fast"])
def test_module_backward_reuses_the_forward_sort(shape):
    """A module step sorts its ids once: the fused backward, which autograd runs on its
    device thread, takes the forward's sorted batch; the update is bitwise the one of
    the backward op on a batch it sorts itself."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    p, q, ranks, n = shape
    table = _make_table(p, q, ranks, n)
    if table is None:
        pytest.skip("torchrec_tt.TTEmbeddingBag needs torchrec")
    ids, offsets = make_bags(n, LENGTHS * 30)
    ids, offsets = ids.to(DEV), offsets.to(DEV)
    g = torch.randn(offsets.numel() - 1, math.prod(q), device=DEV)
    cores = [c.detach().clone() for c in table.tt_cores]
    state = [s.clone() for s in table.optimizer_states()]
    table(ids, offsets[:-1]).backward(g)  # warm-up (smem attributes, allocator)
    for dst, src in zip([*table.tt_cores, *table.optimizer_states()], cores + state, strict=True):
        dst.data.copy_(src)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        table(ids, offsets[:-1]).backward(g)
        torch.cuda.synchronize()
    assert _kernel_launches(prof, "tt_prep_kernel") == 1
    # steps 2-3: one launch (tt_sort_index_kernel) for batches of up to 64 tiles, else cub's sort,
    # the flags and index kernels
    assert _kernel_launches(prof, "tt_index_kernel") + _kernel_launches(prof, "tt_sort_index_kernel") == 1
    tt.tt_embedding_bag_backward_fused_(
        g, cores, state, ids.clone(), offsets.clone(), None, p, q, ranks, n, 0, 1, table.learning_rate, table.eps
    )
    for a, b in zip([*table.tt_cores, *table.optimizer_states()], cores + state, strict=True):
        assert torch.equal(a.detach(), b)


# --------------------------------------------------------------------------- tensor cores on / off
def _run_tests_in_subprocess(select: str, **switches: str) -> None:
    """Runs this file's tests matching ``select`` in a pytest process with the kernels'
    environment ``switches`` (each read once per process) and asserts that they pass."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **switches)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", select],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("mma", ["0", "1"], ids=["fma-only", "tensor-cores-both"])
def test_fast_kernels_other_mma_modes(mma):
    # TORCHREC_TT_CUDA_MMA (read once per process; default: tensor cores in the backward
    # kernel only) = 0: the FMA products in both fast kernels, 1: tensor cores in both. The
    # tests that reach the fast path run again in a process of their own.
    _run_tests_in_subprocess(
        "(matches_reference or many_rows or long_runs or fused or deterministic or graph or one_hot) and not mma "
        "and not tf32",
        TORCHREC_TT_CUDA_MMA=mma,
    )


# --------------------------------------------------------------------------- TF32 matmul precision
# (default tensor-core mode only: the subprocesses of test_fast_kernels_other_mma_modes skip these)
@contextlib.contextmanager
def _float32_matmul_precision(value: str):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# Fast-path shapes: one item per warp slot, many rows per item, core-1 runs across chunks.
TF32_SHAPES = [SHAPES[4], MANY_ROWS_FAST, LONG_CORE1_FAST]


def _assert_within_tf32_bound(out, ref, ref_abs, what):
    # One-pass TF32 products round both operands to 10 mantissa bits (relative error 2^-11
    # each): a product chain's error is at most ~2^-10 of the same chain over absolute
    # values, plus fp32 rounding. 2^-9 leaves room for the fp32 part.
    _assert_within(out, ref, 2.0**-9 * ref_abs, what)


def _assert_within(out, ref, bound, what):
    err = (out.double().cpu() - ref).abs()
    assert bool((err <= bound + 1e-30).all()), (what, float((err / (bound + 1e-30)).max()))


@pytest.mark.parametrize("shape", TF32_SHAPES, ids=lambda s: f"p{s[0]}")
def test_tf32_precision_within_bound_and_deterministic(shape):
    """Under torch's "high" float32 matmul precision the fast backward kernel's tensor-core
    products take one TF32 pass: the core gradients stay within the TF32 error bound of the
    float64 oracle (elementwise, against the oracle over absolute values), differ from the
    fp32-accurate ones (TF32 took effect) and repeat bit for bit; the forward is unchanged."""
    p, q, ranks, n, cores, ids, offsets, w, g, mode = _grad_case(shape, lengths=[5, 0, 40, 3, 64, 1] * 20)
    args = (ids.to(DEV), offsets.to(DEV), w.to(DEV, torch.float32), p, q, ranks, n, mode)
    dev_cores, dev_g = to_dev(cores, torch.float32), g.to(DEV, torch.float32)
    abs_cores, abs_w = [c.abs() for c in cores], w.abs()
    ref_out = reference.tt_embedding_bag_forward(cores, ids, offsets, w, p, q, ranks, n, mode)
    abs_out = reference.tt_embedding_bag_forward(abs_cores, ids, offsets, abs_w, p, q, ranks, n, mode)
    ref_grads = reference.tt_embedding_bag_backward(g, cores, ids, offsets, w, p, q, ranks, n, mode)
    abs_grads = reference.tt_embedding_bag_backward(g.abs(), abs_cores, ids, offsets, abs_w, p, q, ranks, n, mode)
    exact = [tt.tt_embedding_bag_forward(dev_cores, *args), *tt.tt_embedding_bag_backward(dev_g, dev_cores, *args)]
    with _float32_matmul_precision("high"):
        runs = [
            [tt.tt_embedding_bag_forward(dev_cores, *args), *tt.tt_embedding_bag_backward(dev_g, dev_cores, *args)]
            for _ in range(2)
        ]
    for k, (a, b, ref, ref_abs) in enumerate(
        zip(runs[0], runs[1], [ref_out, *ref_grads], [abs_out, *abs_grads], strict=True)
    ):
        _assert_within_tf32_bound(a, ref, ref_abs, k)
        assert torch.equal(a, b), k
    # all three core gradients (core 2's through P) come from TF32 products, the forward not
    assert torch.equal(runs[0][0], exact[0])
    for k, (a, e) in enumerate(zip(runs[0][1:], exact[1:], strict=True)):
        assert not torch.equal(a, e), k


@pytest.mark.parametrize("optimizer", [0, 1])
def test_tf32_precision_fused_update(optimizer):
    # The fused update applies the TF32 gradient: SGD / Adagrad within the bound around the
    # float64 oracle's step (Adagrad: its step is lr g / sqrt(state + g^2), state > 0.1 here).
    p, q, ranks, n = LONG_CORE1_FAST
    cores = make_cores(p, q, ranks)
    ids, offsets = _skewed_bags(n, 4000, 200, "zipf")
    g = torch.randn(offsets.numel() - 1, math.prod(q), dtype=torch.float64)
    state = [] if optimizer == 0 else [torch.rand_like(c) + 0.1 for c in cores]
    ref_cores, ref_state = [c.clone() for c in cores], [s.clone() for s in state]
    reference.tt_embedding_bag_backward_fused_(
        g, ref_cores, ref_state, ids, offsets, None, p, q, ranks, n, 0, optimizer, 0.05, 1e-8
    )
    abs_grads = reference.tt_embedding_bag_backward(
        g.abs(), [c.abs() for c in cores], ids, offsets, None, p, q, ranks, n, 0
    )
    dev_cores, dev_state = to_dev(cores, torch.float32), [s.to(DEV, torch.float32) for s in state]
    batch = (ids.to(DEV), offsets.to(DEV), None, p, q, ranks, n, 0, optimizer, 0.05, 1e-8)
    with _float32_matmul_precision("high"):
        tt.tt_embedding_bag_backward_fused_(g.to(DEV, torch.float32), dev_cores, dev_state, *batch)
    for k in range(len(p)):
        delta_ref = ref_cores[k] - cores[k]
        delta = dev_cores[k].double().cpu() - cores[k].float().double()
        # A gradient error e (|e| <= 2^-9 |grad| over absolute values) moves an SGD step by lr e,
        # an Adagrad step lr g / sqrt(s + g^2) by at most 2 lr e / sqrt(s) (s >= 0.1 here); plus
        # the fp32 rounding of the updated core.
        factor = 1.0 if optimizer == 0 else 2.0 / 0.1**0.5
        bound = 0.05 * factor * 2.0**-9 * abs_grads[k] + 2e-7 * cores[k].abs()
        _assert_within(delta, delta_ref, bound, k)


# --------------------------------------------------------------------------- cub's sort for every batch
def test_cub_sort_path():
    # TORCHREC_TT_CUDA_GRID_SORT=0 (read once per process): every batch takes cub's sort,
    # the flags kernel, cub's scan and the index kernel (the path of batches past 64 tiles).
    _run_tests_in_subprocess(
        "(matches_reference or long_runs or sort_sizes or fused or graph or reuses) and not mma and not cub_sort",
        TORCHREC_TT_CUDA_GRID_SORT="0",
    )


def test_grid_sort_and_cub_sort_give_the_same_bits(tmp_path):
    # Both sorts are stable, so the batch (ties in input order) and every sum are the same.
    p, q, ranks, n = SHAPES[4]
    ids, offsets = _skewed_bags(n, 30_000, 700, "zipf")
    cores = make_cores(p, q, ranks, dtype=torch.float32)
    w = torch.rand(ids.numel()) + 0.5
    g = torch.randn(offsets.numel() - 1, math.prod(q))
    torch.save({"cores": cores, "ids": ids, "offsets": offsets, "w": w, "g": g}, tmp_path / "case.pt")
    code = textwrap.dedent(
        f"""
        import torch, torchrec_tt
        c = torch.load({str(tmp_path / "case.pt")!r})
        args = ([x.cuda() for x in c["cores"]], c["ids"].cuda(), c["offsets"].cuda(), c["w"].cuda())
        shape = ({p!r}, {q!r}, {ranks!r}, {n!r}, 1)
        out = torch.ops.torchrec_tt.tt_embedding_bag_forward(*args, *shape)
        grads = torch.ops.torchrec_tt.tt_embedding_bag_backward(c["g"].cuda(), *args, *shape)
        torch.save([out.cpu(), *[x.cpu() for x in grads]], {str(tmp_path / "out.pt")!r})
        """
    )
    env = dict(os.environ, TORCHREC_TT_CUDA_GRID_SORT="0", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    args = (to_dev(cores, torch.float32), ids.to(DEV), offsets.to(DEV), w.to(DEV))
    out = tt.tt_embedding_bag_forward(*args, p, q, ranks, n, 1)
    grads = tt.tt_embedding_bag_backward(g.to(DEV), *args, p, q, ranks, n, 1)
    for a, b in zip([out, *grads], torch.load(tmp_path / "out.pt"), strict=True):
        assert torch.equal(a.cpu(), b)


def test_grid_sort_repeats_give_the_same_bits():
    # The most tiles the grid sort takes, many distinct keys: a block that scattered before
    # another had loaded its pairs (a race between passes) would change some of the 30 outputs.
    p, q, ranks, n = [50, 60, 70], [4, 4, 4], [1, 32, 32, 1], 200_000  # 18-bit keys: 3 passes
    nnz = 64 * 2048
    ids, offsets = torch.randint(0, n, (nnz,)), torch.arange(0, nnz + 1, 16)
    cores = make_cores(p, q, ranks, dtype=torch.float32)
    args = (to_dev(cores, torch.float32), ids.to(DEV), offsets.to(DEV), None, p, q, ranks, n, 0)
    first = tt.tt_embedding_bag_forward(*args)
    ref = reference.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, n, 0)
    assert rel_err(first, ref) < tol(torch.float32)
    for _ in range(30):
        assert torch.equal(tt.tt_embedding_bag_forward(*args), first)


def test_captured_lookups_take_cubs_sort():
    """Captured into a CUDA graph, steps 2-3 run as cub's sort, the flags, scan and index
    kernels (less GPU time); eagerly, as one tt_sort_index_kernel launch (fewer launches).
    Both give the same bits."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    p, q, ranks, n = [50, 60, 70], [4, 4, 4], [1, 32, 32, 1], 200_000
    ids, offsets = torch.randint(0, n, (2560,), device=DEV), torch.arange(0, 2561, 10, device=DEV)
    cores = to_dev(make_cores(p, q, ranks), torch.float32)

    def lookup():
        return tt.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, n, 0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lookup()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lookup()
    with profile(activities=[ProfilerActivity.CUDA]) as replayed:
        graph.replay()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as eager:
        out = lookup()
        torch.cuda.synchronize()
    assert (_kernel_launches(replayed, "tt_index_kernel"), _kernel_launches(replayed, "tt_sort_index_kernel")) == (1, 0)
    assert (_kernel_launches(eager, "tt_index_kernel"), _kernel_launches(eager, "tt_sort_index_kernel")) == (0, 1)
    assert torch.equal(captured, out)


# --------------------------------------------------------------------------- device-side validation
@pytest.mark.parametrize("bad", ["id", "negative", "offsets"])
def test_device_side_bounds_check(bad):
    code = textwrap.dedent(
        f"""
        import torch, torchrec_tt
        tt = torch.ops.torchrec_tt
        p, q, r, n = [5, 6], [2, 2], [1, 3, 1], 28
        cores = [torch.randn(5, 6, device="cuda"), torch.randn(6, 6, device="cuda")]
        ids = torch.tensor([1, 2, 3, 4], device="cuda")
        offsets = torch.tensor([0, 2, 4], device="cuda")
        if {bad!r} == "id":
            ids[2] = 28
        elif {bad!r} == "negative":
            ids[0] = -1
        else:
            offsets = torch.tensor([0, 3, 2], device="cuda")
        out = tt.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, r, n, 0)
        torch.cuda.synchronize()
        print("NO ERROR")
        """
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    text = res.stdout + res.stderr
    assert "NO ERROR" not in text
    assert "device-side assert" in text or "torchrec_tt" in text, text[-2000:]


# --------------------------------------------------------------------------- > 2^31 output elements
def test_outputs_past_int32_range():
    p, q, ranks, n = [4, 4, 4], [8, 8, 8], [1, 2, 2, 1], 64
    D = 512
    free, _ = torch.cuda.mem_get_info()
    nnz = (1 << 31) // D + 4099  # nnz * D > 2^31
    if free < 3 * nnz * D * 4 + (2 << 30):
        pytest.skip("not enough GPU memory")
    cores64 = make_cores(p, q, ranks)
    cores = to_dev(cores64, torch.float32)
    ids = torch.randint(0, n, (nnz,), device=DEV, dtype=torch.int32)
    rows = tt.tt_lookup_rows(cores, ids, p, q, ranks, n)
    tail = ids[-3000:].long().cpu()
    ref = reference.tt_lookup_rows(cores64, tail, p, q, ranks, n)
    assert rel_err(rows[-3000:], ref) < 1e-5
    del rows
    offsets = torch.arange(0, nnz + 1, device=DEV)  # one id per bag: the output has nnz * D elements
    out = tt.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, n, 0)
    assert rel_err(out[-3000:], ref) < 1e-5
    del out
    # backward: only the last bags carry gradient
    g = torch.zeros(nnz, D, device=DEV)
    g_tail = torch.randn(3000, D, dtype=torch.float64)
    g[-3000:] = g_tail.to(DEV, torch.float32)
    grads = tt.tt_embedding_bag_backward(g, cores, ids, offsets, None, p, q, ranks, n, 0)
    ref_grads = reference.tt_embedding_bag_backward(
        g_tail, cores64, tail, torch.arange(0, 3001), None, p, q, ranks, n, 0
    )
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) < 1e-4
