"""Op-level tests: every op against the float64 dense oracle, for the dispatcher
kernel (C++ when torchrec_tt._C is built) and for the pure-PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import SHAPES, dense_table, pooled, random_bags, random_cores

import torchrec_tt  # noqa: F401
from torchrec_tt.ops import reference

OPS = torch.ops.torchrec_tt

IMPLS = {
    "dispatcher": {
        "forward": OPS.tt_embedding_bag_forward.default,
        "backward": OPS.tt_embedding_bag_backward.default,
        "fused": OPS.tt_embedding_bag_backward_fused_.default,
        "rows": OPS.tt_lookup_rows.default,
    },
    "reference": {
        "forward": reference.tt_embedding_bag_forward,
        "backward": reference.tt_embedding_bag_backward,
        "fused": reference.tt_embedding_bag_backward_fused_,
        "rows": reference.tt_lookup_rows,
    },
}


def _case(shape_idx, index_dtype=torch.int64, weighted=False, lengths=(3, 0, 5, 1, 0, 4)):
    p, q, ranks, n = SHAPES[shape_idx]
    cores = random_cores(p, q, ranks)
    ids, offsets = random_bags(n, list(lengths), index_dtype)
    weights = torch.rand(ids.numel(), dtype=torch.float64) if weighted else None
    return cores, ids, offsets, weights, p, q, ranks, n


def _oracle_grads(cores, ids, offsets, weights, p, q, ranks, n, mode, grad_out):
    leaves = [c.detach().clone().requires_grad_(True) for c in cores]
    out = pooled(dense_table(leaves, p, q, ranks, n), ids, offsets, weights, mode)
    return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_idx", range(len(SHAPES)))
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_and_backward_match_dense_oracle(impl, shape_idx, mode, weighted):
    fns = IMPLS[impl]
    cores, ids, offsets, weights, p, q, ranks, n = _case(shape_idx, weighted=weighted)
    out = fns["forward"](cores, ids, offsets, weights, p, q, ranks, n, mode)
    expected = pooled(dense_table(cores, p, q, ranks, n), ids, offsets, weights, mode)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)

    grad_out = torch.randn_like(out)
    grads = fns["backward"](grad_out, cores, ids, offsets, weights, p, q, ranks, n, mode)
    for g, e in zip(grads, _oracle_grads(cores, ids, offsets, weights, p, q, ranks, n, mode, grad_out), strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_ids_and_rows(impl):
    fns = IMPLS[impl]
    cores, ids, offsets, _, p, q, ranks, n = _case(2, index_dtype=torch.int32)
    out = fns["forward"](cores, ids, offsets, None, p, q, ranks, n, 0)
    out64 = fns["forward"](cores, ids.long(), offsets.long(), None, p, q, ranks, n, 0)
    torch.testing.assert_close(out, out64, rtol=0, atol=0)
    rows = fns["rows"](cores, torch.arange(n, dtype=torch.int32), p, q, ranks, n)
    torch.testing.assert_close(rows, dense_table(cores, p, q, ranks, n), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_bags_empty(impl):
    fns = IMPLS[impl]
    p, q, ranks, n = SHAPES[0]
    cores = random_cores(p, q, ranks)
    ids, offsets = torch.zeros(0, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    out = fns["forward"](cores, ids, offsets, None, p, q, ranks, n, 1)
    assert out.shape == (3, math.prod(q)) and not out.any()
    grads = fns["backward"](torch.ones_like(out), cores, ids, offsets, None, p, q, ranks, n, 1)
    assert all(not g.any() for g in grads)


def _optimizer_oracle(cores, grads, optimizer, lr, eps, states):
    """Apply SGD / Adagrad (torch.optim) or row-wise Adagrad (its formula) to float64 copies."""
    params = [torch.nn.Parameter(c.detach().clone()) for c in cores]
    for prm, g in zip(params, grads, strict=True):
        prm.grad = torch.zeros_like(prm) if g is None else g.clone()
    if optimizer == 0:
        torch.optim.SGD(params, lr=lr).step()
        return [prm.detach() for prm in params], states
    if optimizer == 1:
        opt = torch.optim.Adagrad(params, lr=lr, eps=eps)
        for prm, s in zip(params, states, strict=True):
            opt.state[prm]["step"] = torch.tensor(0.0)
            opt.state[prm]["sum"] = s.clone()
        opt.step()
        return [prm.detach() for prm in params], [opt.state[prm]["sum"] for prm in params]
    new_w, new_s = [], []
    for prm, s in zip(params, states, strict=True):
        s = s + (prm.grad**2).mean(dim=1)
        new_w.append(prm.detach() - lr * prm.grad / (s.sqrt() + eps)[:, None])
        new_s.append(s)
    return new_w, new_s


def _initial_states(cores, optimizer):
    if optimizer == 0:
        return []
    if optimizer == 1:
        return [torch.rand_like(c) for c in cores]
    return [torch.rand(c.shape[0], dtype=c.dtype) for c in cores]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_idx", [0, 2, 3, 4])
@pytest.mark.parametrize("optimizer", [0, 1, 2])
def test_fused_steps_match_torch_optim_on_oracle_gradients(impl, shape_idx, optimizer):
    fns = IMPLS[impl]
    p, q, ranks, n = SHAPES[shape_idx]
    cores = random_cores(p, q, ranks)
    states = _initial_states(cores, optimizer)
    ref_cores, ref_states = [c.clone() for c in cores], [s.clone() for s in states]
    lr, eps = 0.05, 1e-8
    for step in range(3):
        ids, offsets = random_bags(n, [4, 0, 6, 2 + step])
        weights = torch.rand(ids.numel(), dtype=torch.float64)
        mode = step % 2
        grad_out = torch.randn(offsets.numel() - 1, math.prod(q), dtype=torch.float64)
        oracle_grads = _oracle_grads(ref_cores, ids, offsets, weights, p, q, ranks, n, mode, grad_out)
        ref_cores, ref_states = _optimizer_oracle(ref_cores, oracle_grads, optimizer, lr, eps, ref_states)
        fns["fused"](grad_out, cores, states, ids, offsets, weights, p, q, ranks, n, mode, optimizer, lr, eps)
        for c, e in zip(cores + states, ref_cores + ref_states, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-9, atol=1e-11)


def test_fused_updates_every_touched_row_when_p_exceeds_slice_size():
    # FBTT launched its update grid over r*q*r instead of p: rows >= r*q*r were never updated.
    p, q, ranks, n = SHAPES[2]
    cores = random_cores(p, q, ranks)
    before = [c.clone() for c in cores]
    ids = torch.arange(n)
    offsets = torch.tensor([0, n])
    OPS.tt_embedding_bag_backward_fused_(torch.ones(1, math.prod(q), dtype=torch.float64), cores, [], ids, offsets, None, p, q, ranks, n, 0, 0, 0.1, 0.0)
    slice_size = ranks[0] * q[0] * ranks[1]
    assert p[0] > slice_size
    changed = (cores[0] != before[0]).any(dim=1)
    touched = math.ceil(n / (p[1] * p[2]))  # first-core digits reached by ids < n
    assert bool(changed[:touched].all()), f"rows not updated: {torch.nonzero(~changed[:touched]).flatten().tolist()}"
    assert not changed[touched:].any(), "padding rows (never looked up) must not change"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_cores(dtype, tol):
    cores, ids, offsets, weights, p, q, ranks, n = _case(3, weighted=True)
    out = OPS.tt_embedding_bag_forward(
        [c.to(dtype) for c in cores], ids, offsets, weights.to(dtype), p, q, ranks, n, 1
    )
    assert out.dtype == dtype
    expected = pooled(dense_table([c.to(dtype).double() for c in cores], p, q, ranks, n), ids, offsets, weights.to(dtype).double(), 1)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- autograd, opcheck
@pytest.mark.parametrize("mode", [0, 1])
def test_gradcheck_float64_cores_and_weights(mode):
    cores, ids, offsets, weights, p, q, ranks, n = _case(1, weighted=True, lengths=(2, 0, 3))
    leaves = [c.requires_grad_(True) for c in cores] + [weights.requires_grad_(True)]

    def fn(*args):
        return OPS.tt_embedding_bag_forward(list(args[:-1]), ids, offsets, args[-1], p, q, ranks, n, mode)

    assert torch.autograd.gradcheck(fn, leaves)


def _opcheck_samples():
    cores, ids, offsets, weights, p, q, ranks, n = _case(2, weighted=True)
    grad_out = torch.randn(offsets.numel() - 1, math.prod(q), dtype=torch.float64)
    ids32, offsets32 = ids.int(), offsets.int()
    yield OPS.tt_embedding_bag_forward.default, ([c.clone().requires_grad_(True) for c in cores], ids, offsets, weights, p, q, ranks, n, 0)
    yield OPS.tt_embedding_bag_forward.default, ([c.float() for c in cores], ids32, offsets32, None, p, q, ranks, n, 1)
    yield OPS.tt_embedding_bag_backward.default, (grad_out, cores, ids, offsets, weights, p, q, ranks, n, 1)
    yield OPS.tt_lookup_rows.default, ([c.clone().requires_grad_(True) for c in cores], ids, p, q, ranks, n)
    for optimizer, states in ((0, []), (1, [torch.zeros_like(c) for c in cores]), (2, [torch.zeros(c.shape[0], dtype=c.dtype) for c in cores])):
        yield (
            OPS.tt_embedding_bag_backward_fused_.default,
            (grad_out, [c.detach().clone() for c in cores], states, ids, offsets, weights, p, q, ranks, n, 0, optimizer, 0.1, 1e-8),
        )


@pytest.mark.parametrize("sample", list(range(7)))
def test_opcheck(sample):
    op, args = list(_opcheck_samples())[sample]
    torch.library.opcheck(op, args)


def test_double_backward_raises_clearly():
    cores, ids, offsets, _, p, q, ranks, n = _case(0)
    leaves = [c.requires_grad_(True) for c in cores]
    out = OPS.tt_embedding_bag_forward(leaves, ids, offsets, None, p, q, ranks, n, 0)
    grads = torch.autograd.grad(out.pow(2).sum(), leaves, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grads[0].sum().backward()


def test_lookup_rows_gradient_matches_oracle():
    cores, ids, _, _, p, q, ranks, n = _case(3)
    leaves = [c.clone().requires_grad_(True) for c in cores]
    rows = OPS.tt_lookup_rows(leaves, ids, p, q, ranks, n)
    g = torch.randn_like(rows)
    got = torch.autograd.grad(rows, leaves, g)
    oracle_leaves = [c.clone().requires_grad_(True) for c in cores]
    want = torch.autograd.grad(dense_table(oracle_leaves, p, q, ranks, n)[ids], oracle_leaves, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_and_negative_ids_raise_index_error(impl):
    fns = IMPLS[impl]
    cores, ids, offsets, _, p, q, ranks, n = _case(0)
    for bad in (n, -1, 10**9):
        ids_bad = ids.clone()
        ids_bad[2] = bad
        with pytest.raises(IndexError, match=rf"indices\[2\]={bad}.*num_embeddings={n}"):
            fns["forward"](cores, ids_bad, offsets, None, p, q, ranks, n, 0)
        with pytest.raises(IndexError, match=rf"indices\[2\]={bad}"):
            fns["rows"](cores, ids_bad, p, q, ranks, n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "make_offsets,match",
    [
        (lambda o: o[:-1], r"end at indices.numel\(\)"),
        (lambda o: torch.cat([o[:1] + 1, o[1:]]), r"start at 0"),
        (lambda o: torch.tensor([0, 5, 3, o[-1].item()]), r"non-decreasing.*offsets\[1\]=5 > offsets\[2\]=3"),
        (lambda o: o.float(), r"offsets must be a 1-D int32/int64"),
        (lambda o: o.reshape(1, -1), r"offsets must be a 1-D"),
    ],
)
def test_malformed_offsets_raise(impl, make_offsets, match):
    fns = IMPLS[impl]
    cores, ids, offsets, _, p, q, ranks, n = _case(0, lengths=(3, 3, 3))
    with pytest.raises(ValueError, match=match):
        fns["forward"](cores, ids, make_offsets(offsets), None, p, q, ranks, n, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_inconsistent_structure_raises(impl):
    fns = IMPLS[impl]
    cores, ids, offsets, _, p, q, ranks, n = _case(1)
    with pytest.raises(ValueError, match=r"cores\[1\] has shape"):
        fns["forward"](cores, ids, offsets, None, p, [2, 2, 3], ranks, n, 0)
    with pytest.raises(ValueError, match="ranks must have"):
        fns["forward"](cores, ids, offsets, None, p, q, [1, 2, 3, 2], n, 0)
    with pytest.raises(ValueError, match="num_embeddings"):
        fns["forward"](cores, ids, offsets, None, p, q, ranks, math.prod(p) + 1, 0)
    with pytest.raises(ValueError, match="pooling_mode"):
        fns["forward"](cores, ids, offsets, None, p, q, ranks, n, 2)
    with pytest.raises(ValueError, match="per_sample_weights"):
        fns["forward"](cores, ids, offsets, torch.ones(ids.numel() + 1, dtype=torch.float64), p, q, ranks, n, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_bad_input_modifies_nothing(impl):
    fns = IMPLS[impl]
    cores, ids, offsets, _, p, q, ranks, n = _case(2)
    states = [torch.zeros_like(c) for c in cores]
    before = [t.clone() for t in cores + states]
    grad_out = torch.randn(offsets.numel() - 1, math.prod(q), dtype=torch.float64)
    ids_bad = ids.clone()
    ids_bad[-1] = n
    with pytest.raises(IndexError):
        fns["fused"](grad_out, cores, states, ids_bad, offsets, None, p, q, ranks, n, 0, 1, 0.1, 1e-8)
    with pytest.raises(ValueError, match="optimizer_state"):
        fns["fused"](grad_out, cores, states[:1], ids, offsets, None, p, q, ranks, n, 0, 1, 0.1, 1e-8)
    with pytest.raises(ValueError, match="unknown optimizer"):
        fns["fused"](grad_out, cores, states, ids, offsets, None, p, q, ranks, n, 0, 7, 0.1, 1e-8)
    with pytest.raises(ValueError, match="grad_output"):
        fns["fused"](grad_out[1:], cores, states, ids, offsets, None, p, q, ranks, n, 0, 1, 0.1, 1e-8)
    for t, b in zip(cores + states, before, strict=True):
        assert torch.equal(t, b)
