"""Pure-PyTorch reference kernels of the ``torchrec_tt`` ops.

They are registered as the ``CompositeExplicitAutograd`` kernels, so every op
works on any device even without the compiled extension; the C++ and CUDA
kernels override them for their dispatch keys. They are written for clarity and
vectorised with ``bmm`` / ``index_add``, not for speed.

All arithmetic runs in the accumulation dtype (float32 for half/bfloat16 cores,
the cores' dtype otherwise); results are cast back to the cores' dtype.

Algorithms (``d`` cores, ``A_k = cores[k][i_k]`` viewed as ``(r_k, q_k, r_{k+1})``):

* rows: left-to-right chain ``T_k = T_{k-1} @ A_k`` with
  ``T_k`` of shape ``(Q_{<=k}, r_{k+1})``.
* backward: the row gradients are summed per unique id (duplicates coalesced),
  then for every core ``dA_k = L_k^T g R_k^T`` with the left product ``L_k``
  of cores ``< k`` and the right product ``R_k`` of cores ``> k``, and the
  slice gradients are accumulated per digit with ``index_add``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchrec_tt.ops._library import FusedOptimizer, PoolingMode, lib

__all__ = [
    "apply_rows_update_",
    "check_tt_args",
    "row_digits",
    "tt_embedding_bag_backward",
    "tt_embedding_bag_backward_fused_",
    "tt_embedding_bag_forward",
    "tt_lookup_rows",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for cores of ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_tt_args(
    op: str,
    cores: list[Tensor],
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
) -> None:
    """Validate the TT structure arguments shared by every op (no data access).

    Args:
        op (str): op name used in error messages.
        cores (list[Tensor]): TT cores in the internal layout.
        p_shapes (list[int]): row factorisation.
        q_shapes (list[int]): column factorisation.
        ranks (list[int]): ``d + 1`` TT ranks with ``ranks[0] == ranks[d] == 1``.
        num_embeddings (int): number of valid rows, ``<= prod(p_shapes)``.

    Raises:
        ValueError: when any argument is inconsistent; the message names it.

    Example::

        >>> c = [torch.zeros(2, 1 * 2 * 3), torch.zeros(5, 3 * 2 * 1)]
        >>> check_tt_args("op", c, [2, 5], [2, 2], [1, 3, 1], 10)
    """
    d = len(cores)
    if d < 1:
        raise ValueError(f"{op}: cores must hold at least one TT core, got 0")
    if len(p_shapes) != d or len(q_shapes) != d:
        raise ValueError(
            f"{op}: len(p_shapes)={len(p_shapes)} and len(q_shapes)={len(q_shapes)} "
            f"must both equal the number of cores ({d})"
        )
    if len(ranks) != d + 1 or ranks[0] != 1 or ranks[d] != 1:
        raise ValueError(
            f"{op}: ranks must have d + 1 = {d + 1} entries starting and ending "
            f"with 1, got {list(ranks)}"
        )
    if min(p_shapes) < 1 or min(q_shapes) < 1 or min(ranks) < 1:
        raise ValueError(
            f"{op}: p_shapes {list(p_shapes)}, q_shapes {list(q_shapes)} and ranks "
            f"{list(ranks)} must be positive"
        )
    if not 0 <= num_embeddings <= math.prod(p_shapes):
        raise ValueError(
            f"{op}: num_embeddings={num_embeddings} must lie in [0, prod(p_shapes)="
            f"{math.prod(p_shapes)}]"
        )
    for k, core in enumerate(cores):
        expected = (p_shapes[k], ranks[k] * q_shapes[k] * ranks[k + 1])
        if tuple(core.shape) != expected:
            raise ValueError(
                f"{op}: cores[{k}] has shape {tuple(core.shape)}, expected "
                f"[p_k, r_k*q_k*r_k+1] = {list(expected)}"
            )
        if not core.is_floating_point():
            raise ValueError(f"{op}: cores[{k}] must be floating point, got {core.dtype}")
        if core.dtype != cores[0].dtype or core.device != cores[0].device:
            raise ValueError(
                f"{op}: cores[{k}] is {core.dtype} on {core.device} but cores[0] is "
                f"{cores[0].dtype} on {cores[0].device}"
            )


def check_bag_args(
    op: str,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    num_embeddings: int,
    pooling_mode: int,
) -> None:
    """Validate ids, offsets and weights, including their values (host sync).

    Args:
        op (str): op name used in error messages.
        indices (Tensor): 1-D int32/int64 row ids.
        offsets (Tensor): 1-D int32/int64 bag boundaries, ``B + 1`` entries.
        per_sample_weights (Tensor, optional): 1-D weights, one per id.
        num_embeddings (int): ids must lie in ``[0, num_embeddings)``.
        pooling_mode (int): 0 (sum) or 1 (mean).

    Raises:
        ValueError: malformed offsets, weights or arguments.
        IndexError: an id outside ``[0, num_embeddings)``.

    Example::

        >>> check_bag_args("op", torch.tensor([1, 2]), torch.tensor([0, 2]), None, 3, 0)
    """
    for name, t in (("indices", indices), ("offsets", offsets)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{op}: {name} must be a 1-D int32/int64 tensor, got {t.dtype} of "
                f"shape {tuple(t.shape)}"
            )
    if offsets.numel() < 1:
        raise ValueError(f"{op}: offsets must have B + 1 >= 1 entries, got 0")
    if pooling_mode not in (PoolingMode.SUM, PoolingMode.MEAN):
        raise ValueError(f"{op}: pooling_mode must be 0 (sum) or 1 (mean), got {pooling_mode}")
    if per_sample_weights is not None and (
        per_sample_weights.dim() != 1
        or per_sample_weights.numel() != indices.numel()
        or not per_sample_weights.is_floating_point()
    ):
        raise ValueError(
            f"{op}: per_sample_weights must be a 1-D floating tensor with one weight "
            f"per index ({indices.numel()}), got {per_sample_weights.dtype} of shape "
            f"{tuple(per_sample_weights.shape)}"
        )
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != indices.numel():
        raise ValueError(
            f"{op}: offsets must start at 0 and end at indices.numel()="
            f"{indices.numel()}, got offsets[0]={first}, offsets[-1]={last}"
        )
    if offsets.numel() > 1:
        steps = offsets[1:] - offsets[:-1]
        if bool((steps < 0).any()):
            bad = int(torch.nonzero(steps < 0)[0, 0])
            raise ValueError(
                f"{op}: offsets must be non-decreasing, but offsets[{bad}]="
                f"{int(offsets[bad])} > offsets[{bad + 1}]={int(offsets[bad + 1])}"
            )
    check_ids(op, indices, num_embeddings)


def check_ids(op: str, indices: Tensor, num_embeddings: int) -> None:
    """Raise ``IndexError`` naming the first id outside ``[0, num_embeddings)``.

    Args:
        op (str): op name used in error messages.
        indices (Tensor): row ids.
        num_embeddings (int): number of rows.

    Example::

        >>> check_ids("op", torch.tensor([0, 4]), 5)
    """
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= num_embeddings)
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0, 0])
        raise IndexError(
            f"{op}: indices[{pos}]={int(indices[pos])} is out of range "
            f"[0, num_embeddings={num_embeddings})"
        )


def row_digits(indices: Tensor, p_shapes: list[int]) -> list[Tensor]:
    """Mixed-radix digits ``(i_0, ..., i_{d-1})`` of row ids, ``i_0`` most significant.

    Args:
        indices (Tensor): row ids (any integer dtype).
        p_shapes (list[int]): the radices.

    Returns:
        list[Tensor]: one int64 tensor of digits per core.

    Example::

        >>> [t.tolist() for t in row_digits(torch.tensor([7]), [2, 5])]
        [[1], [2]]
    """
    rem = indices.long()
    stride = math.prod(p_shapes)
    digits = []
    for p in p_shapes:
        stride //= p
        digit = torch.div(rem, stride, rounding_mode="floor")
        digits.append(digit)
        rem = rem - digit * stride
    return digits


def _slices(cores: list[Tensor], digits: list[Tensor], ranks: list[int], q_shapes: list[int], dtype: torch.dtype) -> list[Tensor]:
    """Core slices ``A_k`` of shape ``(n, r_k, q_k, r_{k+1})`` in ``dtype``."""
    return [
        core.index_select(0, dig).to(dtype).view(-1, ranks[k], q_shapes[k], ranks[k + 1])
        for k, (core, dig) in enumerate(zip(cores, digits, strict=True))
    ]


def _rows_from_slices(slices: list[Tensor]) -> Tensor:
    """Left-to-right chain: ``(n, D)`` rows from the core slices."""
    n = slices[0].shape[0]
    res = slices[0].reshape(n, -1, slices[0].shape[-1])  # (n, q_0, r_1)
    for a in slices[1:]:
        _, r_in, q, r_out = a.shape
        res = torch.bmm(res, a.reshape(n, r_in, q * r_out)).reshape(n, -1, r_out)
    return res.reshape(n, -1)


def _bags(offsets: Tensor, num_indices: int) -> tuple[Tensor, Tensor]:
    """Bag id of every index and the length of every bag."""
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_indices
    )
    return bag, lengths


def _index_scale(
    offsets: Tensor, num_indices: int, per_sample_weights: Tensor | None, pooling_mode: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Bag id of each index and the factor its row enters the bag with (or None for 1)."""
    bag, lengths = _bags(offsets, num_indices)
    scale = None if per_sample_weights is None else per_sample_weights.to(dtype)
    if pooling_mode == PoolingMode.MEAN:
        inv_len = 1.0 / lengths.clamp(min=1).to(dtype)
        scale = inv_len[bag] if scale is None else scale * inv_len[bag]
    return bag, scale


def tt_lookup_rows(
    cores: list[Tensor], indices: Tensor, p_shapes: list[int], q_shapes: list[int], ranks: list[int], num_embeddings: int
) -> Tensor:
    """Reference kernel of ``torchrec_tt::tt_lookup_rows``: ``(N, D)`` rows."""
    op = "torchrec_tt.tt_lookup_rows"
    check_tt_args(op, cores, p_shapes, q_shapes, ranks, num_embeddings)
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: indices must be a 1-D int32/int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    check_ids(op, indices, num_embeddings)
    dtype = acc_dtype(cores[0].dtype)
    if indices.numel() == 0:
        return cores[0].new_zeros(0, math.prod(q_shapes))
    slices = _slices(cores, row_digits(indices, p_shapes), ranks, q_shapes, dtype)
    return _rows_from_slices(slices).to(cores[0].dtype)


def tt_embedding_bag_forward(
    cores: list[Tensor],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    pooling_mode: int,
) -> Tensor:
    """Reference kernel of ``torchrec_tt::tt_embedding_bag_forward``: ``(B, D)``."""
    op = "torchrec_tt.tt_embedding_bag_forward"
    check_tt_args(op, cores, p_shapes, q_shapes, ranks, num_embeddings)
    check_bag_args(op, indices, offsets, per_sample_weights, num_embeddings, pooling_mode)
    dtype = acc_dtype(cores[0].dtype)
    num_bags, dim = offsets.numel() - 1, math.prod(q_shapes)
    out = torch.zeros(num_bags, dim, dtype=dtype, device=cores[0].device)
    if indices.numel() > 0:
        rows = _rows_from_slices(_slices(cores, row_digits(indices, p_shapes), ranks, q_shapes, dtype))
        bag, scale = _index_scale(offsets, indices.numel(), per_sample_weights, pooling_mode, dtype)
        if scale is not None:
            rows = rows * scale.unsqueeze(1)
        out.index_add_(0, bag, rows)
    return out.to(cores[0].dtype)


def _core_gradients(
    grad_output: Tensor,
    cores: list[Tensor],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    pooling_mode: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Dense core gradients (accumulation dtype) and the digits of the unique ids."""
    dtype = acc_dtype(cores[0].dtype)
    grads = [torch.zeros(c.shape, dtype=dtype, device=c.device) for c in cores]
    if indices.numel() == 0:
        return grads, [indices.new_zeros(0, dtype=torch.long) for _ in cores]
    bag, scale = _index_scale(offsets, indices.numel(), per_sample_weights, pooling_mode, dtype)
    g_rows = grad_output.to(dtype).index_select(0, bag)
    if scale is not None:
        g_rows = g_rows * scale.unsqueeze(1)
    unique, inverse = torch.unique(indices.long(), return_inverse=True)
    n = unique.numel()
    g = torch.zeros(n, g_rows.shape[1], dtype=dtype, device=g_rows.device).index_add_(0, inverse, g_rows)
    digits = row_digits(unique, p_shapes)
    slices = _slices(cores, digits, ranks, q_shapes, dtype)
    d = len(cores)
    lefts = [torch.ones(n, 1, 1, dtype=dtype, device=g.device)]  # (n, Q_<k, r_k)
    for a in slices[:-1]:
        _, r_in, q, r_out = a.shape
        lefts.append(torch.bmm(lefts[-1], a.reshape(n, r_in, q * r_out)).reshape(n, -1, r_out))
    rights = [torch.ones(n, 1, 1, dtype=dtype, device=g.device)]  # (n, r_{k+1}, Q_>k)
    for a in reversed(slices[1:]):
        _, r_in, q, r_out = a.shape
        rights.append(torch.bmm(a.reshape(n, r_in * q, r_out), rights[-1]).reshape(n, r_in, -1))
    rights.reverse()
    for k in range(d):
        left, right = lefts[k], rights[k]
        q_lt, q_gt = left.shape[1], right.shape[2]
        m = torch.bmm(left.transpose(1, 2), g.reshape(n, q_lt, q_shapes[k] * q_gt))
        slice_grad = torch.bmm(m.reshape(n, ranks[k] * q_shapes[k], q_gt), right.transpose(1, 2))
        grads[k].index_add_(0, digits[k], slice_grad.reshape(n, -1))
    return grads, digits


def tt_embedding_bag_backward(
    grad_output: Tensor,
    cores: list[Tensor],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    pooling_mode: int,
) -> list[Tensor]:
    """Reference kernel of ``torchrec_tt::tt_embedding_bag_backward``: core gradients."""
    op = "torchrec_tt.tt_embedding_bag_backward"
    check_tt_args(op, cores, p_shapes, q_shapes, ranks, num_embeddings)
    check_bag_args(op, indices, offsets, per_sample_weights, num_embeddings, pooling_mode)
    _check_grad_output(op, grad_output, offsets, q_shapes)
    grads, _ = _core_gradients(
        grad_output, cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, pooling_mode
    )
    return [g.to(c.dtype) for g, c in zip(grads, cores, strict=True)]


def _check_grad_output(op: str, grad_output: Tensor, offsets: Tensor, q_shapes: list[int]) -> None:
    expected = (offsets.numel() - 1, math.prod(q_shapes))
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"{op}: grad_output has shape {tuple(grad_output.shape)}, expected (B, D) = {expected}")


def check_optimizer_state(
    op: str, cores: list[Tensor], optimizer_state: list[Tensor], optimizer: int
) -> None:
    """Validate the fused optimizer's state tensors against the cores.

    Args:
        op (str): op name used in error messages.
        cores (list[Tensor]): TT cores.
        optimizer_state (list[Tensor]): empty for SGD, one tensor per core
            otherwise: the core's shape (Adagrad) or ``(p_k,)`` (row-wise Adagrad).
        optimizer (int): a :class:`FusedOptimizer` value.

    Raises:
        ValueError: unknown optimizer or mismatched state.

    Example::

        >>> check_optimizer_state("op", [torch.zeros(2, 3)], [], 0)
    """
    if optimizer not in list(FusedOptimizer):
        raise ValueError(f"{op}: unknown optimizer {optimizer}; expected one of {[int(o) for o in FusedOptimizer]}")
    if optimizer == FusedOptimizer.SGD:
        if optimizer_state:
            raise ValueError(f"{op}: SGD takes no optimizer_state, got {len(optimizer_state)} tensors")
        return
    if len(optimizer_state) != len(cores):
        raise ValueError(f"{op}: optimizer_state needs one tensor per core ({len(cores)}), got {len(optimizer_state)}")
    for k, (core, state) in enumerate(zip(cores, optimizer_state, strict=True)):
        expected = tuple(core.shape) if optimizer == FusedOptimizer.ADAGRAD else (core.shape[0],)
        if tuple(state.shape) != expected or state.device != core.device or not state.is_floating_point():
            raise ValueError(
                f"{op}: optimizer_state[{k}] must be a floating tensor of shape {expected} on "
                f"{core.device}, got {state.dtype} {tuple(state.shape)} on {state.device}"
            )


def tt_embedding_bag_backward_fused_(
    grad_output: Tensor,
    cores: list[Tensor],
    optimizer_state: list[Tensor],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    pooling_mode: int,
    optimizer: int,
    learning_rate: float,
    eps: float,
) -> None:
    """Reference kernel of ``torchrec_tt::tt_embedding_bag_backward_fused_``.

    Computes every core gradient from the cores as they are on entry, then
    updates each touched slice once (SGD / Adagrad / row-wise Adagrad).
    """
    op = "torchrec_tt.tt_embedding_bag_backward_fused_"
    check_tt_args(op, cores, p_shapes, q_shapes, ranks, num_embeddings)
    check_bag_args(op, indices, offsets, per_sample_weights, num_embeddings, pooling_mode)
    _check_grad_output(op, grad_output, offsets, q_shapes)
    check_optimizer_state(op, cores, optimizer_state, optimizer)
    grads, digits = _core_gradients(
        grad_output, cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, pooling_mode
    )
    with torch.no_grad():
        for k, core in enumerate(cores):
            touched = torch.unique(digits[k])
            state = optimizer_state[k] if optimizer_state else None
            apply_rows_update_(core, state, touched, grads[k].index_select(0, touched), optimizer, learning_rate, eps)


def apply_rows_update_(
    weight: Tensor, state: Tensor | None, rows: Tensor, grad: Tensor, optimizer: int, learning_rate: float, eps: float
) -> None:
    """One exact optimizer step on ``weight[rows]`` with the summed gradients ``grad`` (in place).

    SGD ``w -= lr g``; Adagrad ``s += g^2, w -= lr g / (sqrt(s) + eps)``; row-wise Adagrad
    ``s += mean(g^2)`` per row, same step. ``state`` (``None`` for SGD) is updated too.

    Args:
        weight (Tensor): ``(n, S)`` rows (core slices or cached rows).
        state (Tensor, optional): optimizer state, ``weight``'s shape (Adagrad) or ``(n,)``.
        rows (Tensor): distinct row numbers to update.
        grad (Tensor): ``(len(rows), S)`` summed gradients in the accumulation dtype.
        optimizer (int): :class:`FusedOptimizer`.
        learning_rate (float): step size.
        eps (float): Adagrad's denominator term.

    Example::

        >>> w = torch.ones(3, 2)
        >>> apply_rows_update_(w, None, torch.tensor([1]), torch.ones(1, 2), FusedOptimizer.SGD, 0.5, 0.0)
        >>> w[:, 0].tolist()
        [1.0, 0.5, 1.0]
    """
    if rows.numel() == 0:
        return
    w = weight.index_select(0, rows).to(grad.dtype)
    if optimizer == FusedOptimizer.SGD:
        w = w - learning_rate * grad
    else:
        assert state is not None
        if optimizer == FusedOptimizer.ADAGRAD:
            s = state.index_select(0, rows).to(grad.dtype) + grad * grad
            w = w - learning_rate * grad / (s.sqrt() + eps)
        else:
            s = state.index_select(0, rows).to(grad.dtype) + (grad * grad).mean(dim=1)
            w = w - learning_rate * grad / (s.sqrt() + eps).unsqueeze(1)
        state.index_copy_(0, rows, s.to(state.dtype))
    weight.index_copy_(0, rows, w.to(weight.dtype))


LFU_EMPTY_KEY = torch.iinfo(torch.int64).max
LFU_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (< 2^32)


def lfu_home_slots(ids: Tensor, size: int) -> Tensor:
    """Home slot ``((id mod H) * 2654435761) mod H`` of every id (int64, no overflow for ``H < 2^31``)."""
    return (ids.long() % size) * LFU_HASH_MULTIPLIER % size


def lfu_cache_record_(hash_keys: Tensor, hash_counts: Tensor, ids: Tensor, max_probes: int) -> Tensor:
    """Count one access of every id; returns the number of ids left uncounted (1 element).

    Linear probing from the home slot over at most ``max_probes`` slots: an id is
    counted in the slot holding it, or claims the first empty one. Vectorised by
    probe round; concurrent claims of one empty slot in a round go to the smallest
    id (deterministic). An id whose probed slots all hold other ids is not counted.
    (The CUDA kernel claims slots with atomic compare-and-swap: same counts for the
    ids it stores, but a contested slot goes to whichever id wins the race.)

    Example::

        >>> keys = torch.full((8,), LFU_EMPTY_KEY); counts = torch.zeros(8, dtype=torch.long)
        >>> lfu_cache_record_(keys, counts, torch.tensor([3, 3, 5]), 4).tolist(), int(counts.sum())
        ([0], 3)
    """
    op = "torchrec_tt.lfu_cache_record_"
    if hash_keys.dtype != torch.int64 or hash_counts.dtype != torch.int64 or hash_keys.shape != hash_counts.shape:
        raise ValueError(f"{op}: hash_keys and hash_counts must be int64 tensors of one shape")
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or max_probes < 1:
        raise ValueError(f"{op}: ids must be 1-D int32/int64 and max_probes >= 1")
    size = hash_keys.numel()
    ids = ids.long()
    pending = torch.ones_like(ids, dtype=torch.bool)
    if ids.numel() == 0 or size == 0:
        return pending.sum().reshape(1)
    home = lfu_home_slots(ids, size)
    where = torch.zeros_like(ids)
    empty = torch.full_like(ids, LFU_EMPTY_KEY)
    for probe in range(max_probes):
        slot = (home + probe) % size
        current = hash_keys.index_select(0, slot)
        found = pending & (current == ids)
        claim = pending & (current == LFU_EMPTY_KEY)
        hash_keys.scatter_reduce_(0, slot, torch.where(claim, ids, empty), reduce="amin")
        resolved = found | (claim & (hash_keys.index_select(0, slot) == ids))
        where = torch.where(resolved, slot, where)
        pending &= ~resolved
        if ids.device.type == "cpu" and not bool(pending.any()):
            break  # free on CPU; elsewhere the fixed loop avoids a host sync per probe
    hash_counts.index_add_(0, where, (~pending).long())
    return pending.sum().reshape(1)


for _name, _fn in (
    ("lfu_cache_record_", lfu_cache_record_),
    ("tt_embedding_bag_forward", tt_embedding_bag_forward),
    ("tt_embedding_bag_backward", tt_embedding_bag_backward),
    ("tt_embedding_bag_backward_fused_", tt_embedding_bag_backward_fused_),
    ("tt_lookup_rows", tt_lookup_rows),
):
    lib.impl(_name, _fn, "CompositeExplicitAutograd")
