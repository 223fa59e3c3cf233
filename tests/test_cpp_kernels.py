"""The C++ CPU kernels (csrc/tt_embedding_bag/tt_embedding_bag_cpu.cpp).

* they are registered for the CPU dispatch key whenever ``torchrec_tt._C`` is built;
* they match an independent float64 oracle (the dense table materialised by
  ``torch.einsum`` over the cores, pooled by ``torch.nn.functional.embedding_bag``,
  differentiated by autograd, optimizer steps written out by hand);
* they validate like the reference (same exception types and messages) and the
  fused op writes nothing when validation fails;
* results do not depend on the number of threads (bitwise);
* ``torch.library.opcheck`` and ``torch.autograd.gradcheck`` pass.

Everything except the registration test is skipped when the extension is not built.
"""

from __future__ import annotations

import importlib.util
import math
import os
import string
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import torchrec_tt
from torchrec_tt.ops import reference

OPS = ("tt_embedding_bag_forward", "tt_embedding_bag_backward", "tt_embedding_bag_backward_fused_", "tt_lookup_rows")
tt = torch.ops.torchrec_tt

needs_cpp = pytest.mark.skipif(not torchrec_tt.HAS_CPP_KERNELS, reason="torchrec_tt._C not built or disabled")

# (p, q, ranks, num_embeddings): 2..5 cores, num_embeddings < prod(p), and at
# least one core with p_k > r_k * q_k * r_{k+1} in each. All but the first have
# their largest slices before the last core: the backward's prefix reuse runs.
SHAPES = [
    ([13, 5], [2, 3], [1, 3, 1], 60),  # core 0: p=13 > 1*2*3
    ([3, 4, 7], [2, 3, 2], [1, 3, 2, 1], 80),  # core 2: p=7 > 2*2*1
    ([2, 3, 2, 9], [2, 1, 2, 2], [1, 2, 3, 2, 1], 100),  # core 3: p=9 > 2*2*1
    ([2, 2, 3, 2, 5], [1, 2, 2, 1, 2], [1, 2, 2, 3, 2, 1], 110),  # core 4: p=5 > 2*2*1
    ([5, 13], [3, 2], [1, 3, 1], 60),  # core 1: p=13 > 3*2*1; core 0 has the larger slices
]
# Bag lengths: empty bags first, in the middle and last.
LENGTHS = [0, 3, 1, 0, 5, 2, 0, 4, 0]


# --------------------------------------------------------------------------- oracle
def dense_table(cores, p, q, ranks, num_embeddings):
    """W (num_embeddings, D) in float64 from the cores viewed as [p_k, r_k, q_k, r_{k+1}]."""
    d = len(cores)
    letters = iter(string.ascii_letters)
    rows = [next(letters) for _ in range(d)]
    cols = [next(letters) for _ in range(d)]
    rk = [next(letters) for _ in range(d + 1)]
    spec = ",".join(f"{rows[k]}{rk[k]}{cols[k]}{rk[k + 1]}" for k in range(d))
    spec += "->" + "".join(rows) + "".join(cols) + rk[0] + rk[d]
    views = [c.double().reshape(p[k], ranks[k], q[k], ranks[k + 1]) for k, c in enumerate(cores)]
    return torch.einsum(spec, *views).reshape(math.prod(p), math.prod(q))[:num_embeddings]


def oracle_pool(weight, indices, offsets, per_sample_weights, mode):
    """Sum pooling by F.embedding_bag; mean = weighted sum / bag length (0 for empty bags)."""
    w = None if per_sample_weights is None else per_sample_weights.double()
    out = F.embedding_bag(
        indices.long(), weight, offsets.long(), mode="sum", per_sample_weights=w, include_last_offset=True
    )
    if mode == 1:
        lengths = (offsets[1:] - offsets[:-1]).double().clamp(min=1)
        out = out / lengths[:, None]
    return out


def oracle_grads(grad_output, cores, indices, offsets, psw, p, q, ranks, n, mode):
    leaves = [c.detach().double().requires_grad_() for c in cores]
    out = oracle_pool(dense_table(leaves, p, q, ranks, n), indices, offsets, psw, mode)
    return torch.autograd.grad(out, leaves, grad_output.double())


def oracle_fused(grads, cores, state, indices, p, optimizer, lr, eps):
    """Exact optimizer step in float64 on the rows touched by ``indices``."""
    cores = [c.double().clone() for c in cores]
    state = [s.double().clone() for s in state]
    rem = indices.long().unique()
    digits = []
    for pk in reversed(p):
        digits.append(rem % pk)
        rem = rem // pk
    digits.reverse()
    for k, (w, g) in enumerate(zip(cores, grads, strict=True)):
        rows = digits[k].unique()
        if optimizer == 0:
            w[rows] -= lr * g[rows]
        elif optimizer == 1:
            state[k][rows] += g[rows] ** 2
            w[rows] -= lr * g[rows] / (state[k][rows].sqrt() + eps)
        else:
            state[k][rows] += (g[rows] ** 2).mean(1)
            w[rows] -= lr * g[rows] / (state[k][rows].sqrt() + eps)[:, None]
    return cores, state


# --------------------------------------------------------------------------- inputs
def make_cores(p, q, ranks, dtype=torch.float64):
    return [
        (0.7 * torch.randn(p[k], ranks[k] * q[k] * ranks[k + 1], dtype=torch.float64)).to(dtype) for k in range(len(p))
    ]


def make_bags(n, lengths=LENGTHS, index_dtype=torch.int64):
    """Ids with duplicates within and across bags (drawn from a small pool, always incl. n - 1)."""
    total = sum(lengths)
    pool = torch.cat([torch.tensor([n - 1, 0]), torch.randint(0, n, (max(total // 3, 1),))])
    ids = pool[torch.randint(0, pool.numel(), (total,))]
    ids[: min(2, total)] = torch.tensor([n - 1, n - 1])[: min(2, total)]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return ids.to(index_dtype), offsets.to(index_dtype)


def make_state(cores, optimizer, dtype=None):
    if optimizer == 0:
        return []
    shape = (lambda c: c.shape) if optimizer == 1 else (lambda c: (c.shape[0],))
    return [torch.rand(shape(c), dtype=dtype or c.dtype) for c in cores]


TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 5e-3, "atol": 5e-3},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
}


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


# --------------------------------------------------------------------------- registration
def test_cpu_kernels_registered_when_extension_built():
    built = importlib.util.find_spec("torchrec_tt._C") is not None
    if not built or os.environ.get("TORCHREC_TT_DISABLE_EXT", "0") == "1":
        pytest.skip("torchrec_tt._C not built or disabled")
    assert torchrec_tt.HAS_CPP_KERNELS
    for op in OPS:
        name = f"torchrec_tt::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), op
        # the CPU kernel is the C++ one, not a Python registration
        cpu_line = next(line for line in torch._C._dispatch_dump(name).splitlines() if line.startswith("CPU:"))
        assert "tt_embedding_bag_cpu.cpp" in cpu_line, cpu_line


# --------------------------------------------------------------------------- numerics
@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{len(s[0])}")
@pytest.mark.parametrize("mode", [0, 1], ids=["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_forward_backward_lookup_match_oracle(shape, mode, weighted):
    p, q, ranks, n = shape
    cores = make_cores(p, q, ranks)
    ids, offs = make_bags(n, index_dtype=torch.int32 if weighted else torch.int64)
    offs = offs.to(torch.int64 if weighted else torch.int32)  # indices and offsets dtypes independent
    psw = torch.rand(ids.numel(), dtype=torch.float32) if weighted else None  # weights in another dtype
    args = (ids, offs, psw, p, q, ranks, n, mode)
    weight = dense_table(cores, p, q, ranks, n)
    close(tt.tt_embedding_bag_forward(cores, *args), oracle_pool(weight, ids, offs, psw, mode), torch.float64)
    go = torch.randn(offs.numel() - 1, math.prod(q), dtype=torch.float64)
    for got, want in zip(tt.tt_embedding_bag_backward(go, cores, *args), oracle_grads(go, cores, *args), strict=True):
        close(got, want, torch.float64)
    close(tt.tt_lookup_rows(cores, ids, p, q, ranks, n), weight[ids.long()], torch.float64)


@needs_cpp
@pytest.mark.parametrize("mode", [0, 1], ids=["sum", "mean"])
def test_forward_and_lookup_over_several_spans_match_oracle(mode):
    # The forward takes whole bags in spans of ~64 MiB of rows: 1024 positions of D = 8192 in
    # float64. Three spans: four bags (the last one empty), one bag longer than a span (pooled
    # a span of its positions at a time), then the rest; every span sorts and deduplicates its
    # own ids.
    p, q, ranks, n = [4, 5, 6], [16, 16, 32], [1, 2, 2, 1], 115
    cores = make_cores(p, q, ranks)
    ids, offs = make_bags(n, lengths=[0, 300, 700, 0, 1500, 200, 0, 400, 0])
    psw = torch.rand(ids.numel(), dtype=torch.float64) if mode == 1 else None
    args = (ids, offs, psw, p, q, ranks, n, mode)
    weight = dense_table(cores, p, q, ranks, n)
    close(tt.tt_embedding_bag_forward(cores, *args), oracle_pool(weight, ids, offs, psw, mode), torch.float64)
    close(tt.tt_lookup_rows(cores, ids, p, q, ranks, n), weight[ids], torch.float64)  # 4 spans of positions


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: f"d{len(s[0])}")
@pytest.mark.parametrize(
    "optimizer,state_dtype",
    [(0, None), (1, None), (1, torch.float32), (2, None), (2, torch.float32)],
    ids=["sgd", "adagrad-state_same", "adagrad-state_f32", "rowwise_adagrad-state_same", "rowwise_adagrad-state_f32"],
)
def test_fused_matches_oracle(shape, optimizer, state_dtype):
    p, q, ranks, n = shape
    cores = make_cores(p, q, ranks)
    state = make_state(cores, optimizer, state_dtype)
    ids, offs = make_bags(n)
    psw = torch.rand(ids.numel(), dtype=torch.float64)
    go = torch.randn(offs.numel() - 1, math.prod(q), dtype=torch.float64)
    lr, eps = 0.3, 1e-3
    grads = oracle_grads(go, cores, ids, offs, psw, p, q, ranks, n, 1)
    want_cores, want_state = oracle_fused(grads, cores, state, ids, p, optimizer, lr, eps)
    tt.tt_embedding_bag_backward_fused_(go, cores, state, ids, offs, psw, p, q, ranks, n, 1, optimizer, lr, eps)
    state_tol = torch.float64 if state_dtype is None else torch.float32
    for k in range(len(cores)):
        close(cores[k], want_cores[k], state_tol)
        if state:
            assert state[k].dtype == (state_dtype or torch.float64)
            close(state[k], want_state[k], state_tol)


@needs_cpp
def test_backward_over_several_chunks_and_few_ids_matches_oracle():
    # ~20000 unique ids of 8192-id chunks (4 MiB of the small cores' float64 slices): the
    # chunk buffer is reused, and ids of one prefix item straddle a chunk's end.
    p, q, ranks, n = [30, 40, 50], [2, 2, 2], [1, 16, 16, 1], 60000
    cores = make_cores(p, q, ranks)
    lengths = [0, *([5] * 4999), 7]
    ids = torch.cat([torch.randint(0, n, (sum(lengths) - 200,)), torch.arange(0, 400, 2)])  # runs of shared prefixes
    offs = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    go = torch.randn(len(lengths), math.prod(q), dtype=torch.float64)
    args = (ids, offs, None, p, q, ranks, n, 0)
    for got, want in zip(tt.tt_embedding_bag_backward(go, cores, *args), oracle_grads(go, cores, *args), strict=True):
        close(got, want, torch.float64)
    # fewer unique ids than the last core has slices: each id's slice is transposed on its own
    ids, offs = torch.tensor([7, 7 + 50, 7, 3 * 50 + 9]), torch.tensor([0, 1, 4])
    go = torch.randn(2, math.prod(q), dtype=torch.float64)
    args = (ids, offs, None, p, q, ranks, n, 0)
    for got, want in zip(tt.tt_embedding_bag_backward(go, cores, *args), oracle_grads(go, cores, *args), strict=True):
        close(got, want, torch.float64)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_reused_within_a_span_are_bitwise_the_rows_alone(dtype):
    # Duplicates and ids of one prefix (i_0, i_1) share work in a span of the forward and of
    # tt_lookup_rows; each row must still be bitwise the row computed alone.
    p, q, ranks, n = [6, 5, 40], [4, 4, 4], [1, 8, 8, 1], 1200
    cores = make_cores(p, q, ranks, dtype)
    ids = torch.tensor([7, 47, 7, 87, 3 * 40 + 5, 7, 47, 1199, 1199, 8])  # prefixes shared, duplicates
    alone = torch.cat([tt.tt_lookup_rows(cores, ids[i : i + 1], p, q, ranks, n) for i in range(ids.numel())])
    assert torch.equal(tt.tt_lookup_rows(cores, ids, p, q, ranks, n), alone)
    offs = torch.arange(ids.numel() + 1)  # bags of one: the forward's output rows are the rows
    assert torch.equal(tt.tt_embedding_bag_forward(cores, ids, offs, None, p, q, ranks, n, 0), alone)


@needs_cpp
def test_fused_updates_every_touched_row_when_p_exceeds_slice_size():
    # core 0 has p=40 rows but slices of 1*2*2 = 4 elements; touch rows >= 4 of it.
    p, q, ranks, n = [40, 3], [2, 2], [1, 2, 1], 120
    cores = make_cores(p, q, ranks)
    before = [c.clone() for c in cores]
    ids = torch.tensor([3 * 39 + 2, 3 * 17, 3 * 5 + 1, 3 * 17])
    offs = torch.tensor([0, 2, 4])
    tt.tt_embedding_bag_backward_fused_(
        torch.ones(2, 4, dtype=torch.float64), cores, [], ids, offs, None, p, q, ranks, n, 0, 0, 0.5, 0.0
    )
    changed = (cores[0] != before[0]).any(1).nonzero().flatten().tolist()
    assert changed == [5, 17, 39]
    assert (cores[1] != before[1]).any(1).nonzero().flatten().tolist() == [0, 1, 2]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_cores(dtype):
    p, q, ranks, n = SHAPES[1]
    cores = make_cores(p, q, ranks, dtype)
    ids, offs = make_bags(n)
    psw = torch.rand(ids.numel(), dtype=torch.float64)
    args = (ids, offs, psw, p, q, ranks, n, 1)
    out = tt.tt_embedding_bag_forward(cores, *args)
    assert out.dtype == dtype
    close(out, oracle_pool(dense_table(cores, p, q, ranks, n), ids, offs, psw, 1), dtype)
    go = torch.randn(offs.numel() - 1, math.prod(q), dtype=dtype)
    for got, want in zip(tt.tt_embedding_bag_backward(go, cores, *args), oracle_grads(go, cores, *args), strict=True):
        assert got.dtype == dtype
        close(got, want, dtype)
    rows = tt.tt_lookup_rows(cores, ids, p, q, ranks, n)
    assert rows.dtype == dtype
    close(rows, dense_table(cores, p, q, ranks, n)[ids], dtype)
    # fused row-wise Adagrad with float32 state on low-precision cores
    state = make_state(cores, 2, torch.float32)
    grads = oracle_grads(go, cores, *args)
    want_cores, want_state = oracle_fused(grads, cores, state, ids, p, 2, 0.1, 1e-2)
    tt.tt_embedding_bag_backward_fused_(go, cores, state, ids, offs, psw, p, q, ranks, n, 1, 2, 0.1, 1e-2)
    for k in range(len(cores)):
        assert cores[k].dtype == dtype and state[k].dtype == torch.float32
        close(cores[k], want_cores[k], dtype)
        close(state[k], want_state[k], dtype)


@needs_cpp
def test_all_bags_empty_and_no_bags():
    p, q, ranks, n = SHAPES[0]
    cores = make_cores(p, q, ranks)
    empty = torch.zeros(0, dtype=torch.int64)
    out = tt.tt_embedding_bag_forward(cores, empty, torch.zeros(4, dtype=torch.int64), None, p, q, ranks, n, 1)
    assert out.shape == (3, 6) and not out.any()
    assert tt.tt_embedding_bag_forward(
        cores, empty, torch.zeros(1, dtype=torch.int64), None, p, q, ranks, n, 0
    ).shape == (0, 6)
    grads = tt.tt_embedding_bag_backward(
        torch.ones(3, 6, dtype=torch.float64), cores, empty, torch.zeros(4, dtype=torch.int64), None, p, q, ranks, n, 0
    )
    assert all(not g.any() and g.shape == c.shape for g, c in zip(grads, cores, strict=True))
    assert tt.tt_lookup_rows(cores, empty, p, q, ranks, n).shape == (0, 6)


@needs_cpp
def test_non_contiguous_cores_and_state():
    p, q, ranks, n = SHAPES[1]
    cores = [c.t().contiguous().t() for c in make_cores(p, q, ranks)]  # column-major
    state = [torch.rand(c.shape[1], c.shape[0], dtype=torch.float64).t() for c in cores]
    assert not cores[1].is_contiguous() and not state[1].is_contiguous()
    ids, offs = make_bags(n)
    go = torch.randn(offs.numel() - 1, math.prod(q), dtype=torch.float64)
    args = (ids, offs, None, p, q, ranks, n, 0)
    close(
        tt.tt_embedding_bag_forward(cores, *args),
        oracle_pool(dense_table(cores, p, q, ranks, n), ids, offs, None, 0),
        torch.float64,
    )
    want_cores, want_state = oracle_fused(oracle_grads(go, cores, *args), cores, state, ids, p, 1, 0.2, 1e-3)
    tt.tt_embedding_bag_backward_fused_(go, cores, state, *args, 1, 0.2, 1e-3)
    for k in range(len(cores)):
        close(cores[k], want_cores[k], torch.float64)
        close(state[k], want_state[k], torch.float64)


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{len(s[0])}")
def test_backward_many_ids_per_digit(shape):
    # Hundreds of ids over few digits: long runs of ids sharing the slice of the
    # largest core (the backward batches those) and many duplicates.
    p, q, ranks, n = shape
    cores = make_cores(p, q, ranks)
    ids, offs = make_bags(n, lengths=[0, *([7] * 60), 0])
    ids[::3] = torch.randint(0, n, (ids[::3].numel(),))
    psw = torch.rand(ids.numel(), dtype=torch.float64)
    go = torch.randn(offs.numel() - 1, math.prod(q), dtype=torch.float64)
    args = (ids, offs, psw, p, q, ranks, n, 1)
    grads = oracle_grads(go, cores, *args)
    for got, want in zip(tt.tt_embedding_bag_backward(go, cores, *args), grads, strict=True):
        close(got, want, torch.float64)
    state = make_state(cores, 1)
    want_cores, want_state = oracle_fused(grads, cores, state, ids, p, 1, 0.1, 1e-3)
    tt.tt_embedding_bag_backward_fused_(go, cores, state, *args, 1, 0.1, 1e-3)
    for k in range(len(cores)):
        close(cores[k], want_cores[k], torch.float64)
        close(state[k], want_state[k], torch.float64)


@needs_cpp
def test_wide_rows_long_bags():
    # D = 2048: the forward works in blocks of a few positions, so bags span
    # several blocks and one bag is longer than a block.
    p, q, ranks, n = [5, 3, 4], [16, 16, 8], [1, 2, 2, 1], 55
    cores = make_cores(p, q, ranks)
    ids, offs = make_bags(n, lengths=[0, 50, 3, 0, 17, 1, 40, 0])
    psw = torch.rand(ids.numel(), dtype=torch.float64)
    weight = dense_table(cores, p, q, ranks, n)
    for mode in (0, 1):
        args = (ids, offs, psw, p, q, ranks, n, mode)
        close(tt.tt_embedding_bag_forward(cores, *args), oracle_pool(weight, ids, offs, psw, mode), torch.float64)
    go = torch.randn(offs.numel() - 1, math.prod(q), dtype=torch.float64)
    for got, want in zip(tt.tt_embedding_bag_backward(go, cores, *args), oracle_grads(go, cores, *args), strict=True):
        close(got, want, torch.float64)
    close(tt.tt_lookup_rows(cores, ids, p, q, ranks, n), weight[ids], torch.float64)


_ISA_SCRIPT = """
import math, sys, torch
sys.path.insert(0, sys.argv[1])
import test_cpp_kernels as t
torch.manual_seed(0)
for p, q, ranks, n in [t.SHAPES[1], t.SHAPES[3], ([7, 9, 5], [4, 8, 2], [1, 16, 8, 1], 300)]:
    for dtype in (torch.float64, torch.float32):
        cores = t.make_cores(p, q, ranks, dtype)
        ids, offs = t.make_bags(n)
        psw = torch.rand(ids.numel(), dtype=dtype)
        args = (ids, offs, psw, p, q, ranks, n, 1)
        t.close(t.tt.tt_embedding_bag_forward(cores, *args), t.oracle_pool(t.dense_table(cores, p, q, ranks, n), ids, offs, psw, 1), dtype)
        go = torch.randn(offs.numel() - 1, math.prod(q), dtype=dtype)
        for got, want in zip(t.tt.tt_embedding_bag_backward(go, cores, *args), t.oracle_grads(go, cores, *args)):
            t.close(got, want, dtype)
print("ok")
"""


@needs_cpp
def test_baseline_instruction_set_variant():
    # mm, the only SIMD kernel, exists as baseline (SSE2), AVX2 and AVX-512
    # variants picked from at::get_cpu_capability(), which ATEN_CPU_CAPABILITY
    # overrides once per process: check the baseline one in a subprocess
    # (this process uses the best one; CI can run the file under each setting).
    proc = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, os.path.dirname(__file__)],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --------------------------------------------------------------------------- determinism
@needs_cpp
def test_results_do_not_depend_on_thread_count():
    p, q, ranks, n = [11, 13, 7], [4, 2, 4], [1, 8, 6, 1], 1000
    cores = make_cores(p, q, ranks, torch.float32)
    ids, offs = make_bags(n, lengths=[0, *torch.randint(0, 12, (300,)).tolist(), 0])
    ids[::7] = 5  # heavy duplicates
    psw = torch.rand(ids.numel())
    go = torch.randn(offs.numel() - 1, math.prod(q))
    args = (ids, offs, psw, p, q, ranks, n, 1)

    def run():
        fwd = tt.tt_embedding_bag_forward(cores, *args)
        bwd = tt.tt_embedding_bag_backward(go, cores, *args)
        fused = [c.clone() for c in cores]
        state = make_state(fused, 1)
        for s in state:
            s.fill_(0.1)
        tt.tt_embedding_bag_backward_fused_(go, fused, state, *args, 1, 0.1, 1e-4)
        return [fwd, *bwd, *fused, *state, tt.tt_lookup_rows(cores, ids, p, q, ranks, n)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- validation
def _bad_cases():
    p, q, ranks, n = SHAPES[1]
    ids, offs = torch.tensor([1, 79, 5]), torch.tensor([0, 1, 3])
    good = {"ids": ids, "offs": offs, "psw": None, "p": p, "q": q, "ranks": ranks, "n": n, "mode": 0}
    cases = {
        "id_too_large": {"ids": torch.tensor([1, 80, 5])},
        "id_negative_int32": {"ids": torch.tensor([1, 2, -1], dtype=torch.int32)},
        "offsets_start": {"offs": torch.tensor([1, 1, 3])},
        "offsets_end": {"offs": torch.tensor([0, 1, 2])},
        "offsets_decreasing": {"offs": torch.tensor([0, 2, 1, 3])},
        "offsets_empty": {"offs": torch.zeros(0, dtype=torch.int64)},
        "offsets_float": {"offs": torch.tensor([0.0, 3.0])},
        "ids_2d": {"ids": torch.tensor([[1, 2, 3]])},
        "pooling_mode": {"mode": 2},
        "psw_shape": {"psw": torch.ones(2)},
        "psw_int": {"psw": torch.ones(3, dtype=torch.int64)},
        "ranks": {"ranks": [1, 3, 2, 2]},
        "ranks_len": {"ranks": [1, 3, 1]},
        "p_len": {"p": [3, 4]},
        "q_nonpositive": {"q": [2, 0, 2], "ranks": [1, 3, 2, 1]},
        "num_embeddings": {"n": 85},
        "core_shape": {"q": [2, 3, 3]},
    }
    return good, cases


def _call(fn, cores, a, go=None, state=None, optimizer=0):
    if fn == "forward":
        return (tt.tt_embedding_bag_forward, reference.tt_embedding_bag_forward), (
            cores,
            a["ids"],
            a["offs"],
            a["psw"],
            a["p"],
            a["q"],
            a["ranks"],
            a["n"],
            a["mode"],
        )
    if fn == "lookup":
        return (tt.tt_lookup_rows, reference.tt_lookup_rows), (cores, a["ids"], a["p"], a["q"], a["ranks"], a["n"])
    common = (a["ids"], a["offs"], a["psw"], a["p"], a["q"], a["ranks"], a["n"], a["mode"])
    if fn == "backward":
        return (tt.tt_embedding_bag_backward, reference.tt_embedding_bag_backward), (go, cores, *common)
    return (tt.tt_embedding_bag_backward_fused_, reference.tt_embedding_bag_backward_fused_), (
        go,
        cores,
        state,
        *common,
        optimizer,
        0.1,
        1e-3,
    )


def _raised(fn, args):
    with pytest.raises((ValueError, IndexError)) as info:
        fn(*args)
    return info.type, str(info.value).splitlines()[0]


@needs_cpp
@pytest.mark.parametrize("fn", ["forward", "backward", "fused", "lookup"])
def test_errors_match_reference_and_fused_writes_nothing(fn):
    good, cases = _bad_cases()
    p, q, ranks, n = SHAPES[1]
    for name, change in cases.items():
        if fn == "lookup" and any(k in change for k in ("offs", "psw", "mode")):
            continue
        args = {**good, **change}
        cores = make_cores(p, q, ranks)
        state = make_state(cores, 2)
        before = [t.clone() for t in (*cores, *state)]
        go = torch.ones(good["offs"].numel() - 1, math.prod(q), dtype=torch.float64)
        (cpp, ref), call_args = _call(fn, cores, args, go, state, 2)
        got = _raised(cpp, call_args)
        assert got == _raised(ref, call_args), name
        if fn == "fused":
            assert all(torch.equal(a, b) for a, b in zip((*cores, *state), before, strict=True)), name


@needs_cpp
def test_fused_specific_errors_match_reference():
    p, q, ranks, n = SHAPES[1]
    ids, offs = torch.tensor([1, 5, 2]), torch.tensor([0, 1, 3])
    go = torch.ones(2, math.prod(q), dtype=torch.float64)
    for optimizer, state_fn, grad in [
        (3, lambda c: [], go),  # unknown optimizer
        (0, lambda c: [torch.zeros_like(c[0])], go),  # SGD with state
        (1, lambda c: [torch.zeros_like(x) for x in c[:2]], go),  # one state short
        (2, lambda c: [torch.zeros_like(x) for x in c], go),  # row-wise needs (p_k,)
        (1, lambda c: [torch.zeros(x.shape, dtype=torch.int64) for x in c], go),  # integer state
        (0, lambda c: [], torch.ones(3, math.prod(q), dtype=torch.float64)),  # grad_output shape
    ]:
        cores = make_cores(p, q, ranks)
        state = state_fn(cores)
        before = [t.clone() for t in (*cores, *state)]
        args = (grad, cores, state, ids, offs, None, p, q, ranks, n, 0, optimizer, 0.1, 1e-3)
        assert _raised(tt.tt_embedding_bag_backward_fused_, args) == _raised(
            reference.tt_embedding_bag_backward_fused_, args
        )
        assert all(torch.equal(a, b) for a, b in zip((*cores, *state), before, strict=True))
    # the id check runs before any write even when the bad id is the last one
    cores = make_cores(p, q, ranks)
    before = [c.clone() for c in cores]
    with pytest.raises(IndexError, match=r"indices\[2\]=80 is out of range \[0, num_embeddings=80\)"):
        tt.tt_embedding_bag_backward_fused_(
            go, cores, [], torch.tensor([1, 2, 80]), offs, None, p, q, ranks, n, 0, 0, 0.1, 0.0
        )
    assert all(torch.equal(a, b) for a, b in zip(cores, before, strict=True))


# --------------------------------------------------------------------------- opcheck / gradcheck
def _opcheck_samples(dtype):
    p, q, ranks, n = SHAPES[1]
    cores = make_cores(p, q, ranks, dtype)
    ids, offs = make_bags(n, lengths=[0, 3, 2, 0])
    psw = torch.rand(ids.numel(), dtype=dtype)
    go = torch.randn(offs.numel() - 1, math.prod(q), dtype=dtype)
    common = (ids, offs, psw, p, q, ranks, n, 1)
    grad_cores = [c.clone().requires_grad_() for c in cores]
    return [
        (tt.tt_embedding_bag_forward.default, (grad_cores, *common)),
        (tt.tt_embedding_bag_forward.default, (cores, ids.int(), offs, None, p, q, ranks, n, 0)),
        (tt.tt_embedding_bag_backward.default, (go, cores, *common)),
        (
            tt.tt_embedding_bag_backward_fused_.default,
            (go, [c.clone() for c in cores], make_state(cores, 1), *common, 1, 0.1, 1e-3),
        ),
        (tt.tt_lookup_rows.default, (cores, ids, p, q, ranks, n)),
    ]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    for op, args in _opcheck_samples(dtype):
        torch.library.opcheck(op, args)


@needs_cpp
@pytest.mark.parametrize("mode", [0, 1], ids=["sum", "mean"])
def test_gradcheck_through_dispatcher(mode):
    p, q, ranks, n = SHAPES[2]
    cores = [c.requires_grad_() for c in make_cores(p, q, ranks)]
    ids, offs = make_bags(n, lengths=[0, 3, 2, 0, 4])
    psw = torch.rand(ids.numel(), dtype=torch.float64, requires_grad=True)

    def f(psw, *cores):
        return tt.tt_embedding_bag_forward(list(cores), ids, offs, psw, p, q, ranks, n, mode)

    assert torch.autograd.gradcheck(f, (psw, *cores))
