"""Reference kernels of the cached TT ops, composed of the TT ops.

``tt_cached_embedding_bag_forward`` and ``tt_cached_embedding_bag_backward_fused_``
serve the ids found in a sorted ``cache_ids`` from the rows ``cache_weight`` and the
others from the TT cores. Here (the ``CompositeExplicitAutograd`` kernels: CPU and any
device without its own kernel) the lookup is split explicitly: the hits are pooled with
``index_add``, the misses are compacted into their own bags (same bag boundaries, pooling
weights that carry the mean's ``1 / length``) and go through the TT ops, which dispatch to
the C++ CPU kernels. The CUDA kernels do it in one pass instead (hits sorted after the TT
ids, see ``csrc/tt_embedding_bag/tt_embedding_bag_cuda.cu``), without a host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchrec_tt.ops._library import FusedOptimizer, PoolingMode, lib
from torchrec_tt.ops.reference import (
    _check_grad_output,
    _index_scale,
    acc_dtype,
    apply_rows_update_,
    check_bag_args,
    check_optimizer_state,
    check_tt_args,
)

__all__ = ["cache_slots", "tt_cached_embedding_bag_backward_fused_", "tt_cached_embedding_bag_forward"]

_ops = torch.ops.torchrec_tt


def cache_slots(cache_ids: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Slot of every id in the sorted ``cache_ids`` and whether it is there.

    Args:
        cache_ids (Tensor): sorted int64 cached ids (empty slots hold ``2**63 - 1`` at the end).
        indices (Tensor): ids to look up.

    Returns:
        tuple[Tensor, Tensor]: int64 slots (meaningful where found) and the bool hit mask.

    Example::

        >>> slot, hit = cache_slots(torch.tensor([3, 8]), torch.tensor([8, 5]))
        >>> slot.tolist(), hit.tolist()
        ([1, 1], [True, False])
    """
    ids = indices.long()
    slot = torch.searchsorted(cache_ids, ids).clamp_(max=cache_ids.numel() - 1)
    return slot, cache_ids.index_select(0, slot) == ids


def _check_cache(op: str, cores: list[Tensor], cache_ids: Tensor, cache_weight: Tensor, dim: int) -> None:
    if cache_ids.dim() != 1 or cache_ids.dtype != torch.int64 or cache_ids.numel() < 1:
        raise ValueError(
            f"{op}: cache_ids must be a non-empty 1-D int64 tensor, got {cache_ids.dtype} of shape {tuple(cache_ids.shape)}"
        )
    if tuple(cache_weight.shape) != (cache_ids.numel(), dim):
        raise ValueError(
            f"{op}: cache_weight must be ({cache_ids.numel()}, {dim}) (cache_ids.numel(), embedding dim), "
            f"got {tuple(cache_weight.shape)}"
        )
    if cache_weight.dtype != cores[0].dtype or cache_weight.device != cores[0].device or cache_ids.device != cores[0].device:
        raise ValueError(
            f"{op}: cache_ids / cache_weight ({cache_ids.device}, {cache_weight.dtype} on {cache_weight.device}) must "
            f"match the cores ({cores[0].dtype} on {cores[0].device})"
        )
    if cache_ids.numel() > 1 and bool((cache_ids[1:] < cache_ids[:-1]).any()):
        raise ValueError(f"{op}: cache_ids must be sorted ascending")


def _split(
    cache_ids: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, pooling_mode: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(slot, hit, bag, scale) of every position and the TT part (ids, offsets, weights) compacted."""
    nnz = indices.numel()
    slot, hit = cache_slots(cache_ids, indices)
    bag, scale = _index_scale(offsets, nnz, per_sample_weights, pooling_mode, dtype)
    if scale is None:
        scale = torch.ones(nnz, dtype=dtype, device=indices.device)
    miss = ~hit
    before = torch.zeros(nnz + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(miss, 0, out=before[1:])
    miss_offsets = before.index_select(0, offsets.long()).to(offsets.dtype)
    return slot, hit, bag, scale, indices[miss], miss_offsets, scale[miss]


def _check_counting(op: str, device: torch.device, hash_keys: Tensor, hash_counts: Tensor, stats: Tensor, max_probes: int) -> None:
    for name, tensor in (("hash_keys", hash_keys), ("hash_counts", hash_counts), ("stats", stats)):
        if tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but the cores on {device}")
    if hash_keys.dtype != torch.int64 or hash_counts.dtype != torch.int64 or hash_keys.shape != hash_counts.shape:
        raise ValueError(f"{op}: hash_keys and hash_counts must be int64 tensors of one shape")
    if stats.dim() != 1 or stats.dtype != torch.int64 or stats.numel() < 5:
        raise ValueError(f"{op}: stats must be a 1-D int64 tensor of >= 5 counters, got {stats.dtype} {tuple(stats.shape)}")
    if max_probes < 1:
        raise ValueError(f"{op}: max_probes must be >= 1, got {max_probes}")


def tt_cached_embedding_bag_forward(
    cores: list[Tensor],
    cache_ids: Tensor,
    cache_weight: Tensor,
    hash_keys: Tensor,
    hash_counts: Tensor,
    stats: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    pooling_mode: int,
    max_probes: int,
    count: bool,
) -> Tensor:
    """Reference kernel of ``torchrec_tt::tt_cached_embedding_bag_forward``: ``(B, D)``; updates ``stats`` (and counts)."""
    op = "torchrec_tt.tt_cached_embedding_bag_forward"
    check_tt_args(op, cores, p_shapes, q_shapes, ranks, num_embeddings)
    check_bag_args(op, indices, offsets, per_sample_weights, num_embeddings, pooling_mode)
    _check_cache(op, cores, cache_ids, cache_weight, math.prod(q_shapes))
    _check_counting(op, cores[0].device, hash_keys, hash_counts, stats, max_probes)
    dtype = acc_dtype(cores[0].dtype)
    slot, hit, bag, scale, miss_ids, miss_offsets, miss_scale = _split(
        cache_ids, indices, offsets, per_sample_weights, pooling_mode, dtype
    )
    out = torch.zeros(offsets.numel() - 1, math.prod(q_shapes), dtype=dtype, device=cores[0].device)
    hit_rows = cache_weight.index_select(0, slot[hit]).to(dtype) * scale[hit].unsqueeze(1)
    out.index_add_(0, bag[hit], hit_rows)
    if miss_ids.numel():
        out += _ops.tt_embedding_bag_forward.default(
            cores, miss_ids, miss_offsets, miss_scale, p_shapes, q_shapes, ranks, num_embeddings,
            PoolingMode.SUM,
        ).to(dtype)
    with torch.no_grad():
        stats[0] += indices.numel()
        stats[1] += hit.sum()
        stats[2] += torch.unique(miss_ids).numel()
        if count:
            stats[4] += _ops.lfu_cache_record_.default(hash_keys, hash_counts, indices, max_probes)[0]
    return out.to(cores[0].dtype)


def tt_cached_embedding_bag_backward_fused_(
    grad_output: Tensor,
    cores: list[Tensor],
    optimizer_state: list[Tensor],
    cache_ids: Tensor,
    cache_weight: Tensor,
    cache_optimizer_state: list[Tensor],
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
    """Reference kernel of ``torchrec_tt::tt_cached_embedding_bag_backward_fused_``.

    The cached rows hit by the lookup take one exact optimizer step with their summed
    gradients (as the rows of an uncompressed table); the cores take the fused TT step
    for the missed ids. Both use ``grad_output`` only, so their order does not matter.
    """
    op = "torchrec_tt.tt_cached_embedding_bag_backward_fused_"
    check_tt_args(op, cores, p_shapes, q_shapes, ranks, num_embeddings)
    check_bag_args(op, indices, offsets, per_sample_weights, num_embeddings, pooling_mode)
    _check_grad_output(op, grad_output, offsets, q_shapes)
    check_optimizer_state(op, cores, optimizer_state, optimizer)
    _check_cache(op, cores, cache_ids, cache_weight, math.prod(q_shapes))
    if len(cache_optimizer_state) != (0 if optimizer == FusedOptimizer.SGD else 1):
        raise ValueError(
            f"{op}: cache_optimizer_state must hold {'no tensor (SGD)' if optimizer == FusedOptimizer.SGD else 'one tensor'}, "
            f"got {len(cache_optimizer_state)}"
        )
    check_optimizer_state(op, [cache_weight], list(cache_optimizer_state), optimizer)
    dtype = acc_dtype(cores[0].dtype)
    slot, hit, bag, scale, miss_ids, miss_offsets, miss_scale = _split(
        cache_ids, indices, offsets, per_sample_weights, pooling_mode, dtype
    )
    with torch.no_grad():
        hit_slots = slot[hit]
        grads = torch.zeros(cache_weight.shape, dtype=dtype, device=cache_weight.device)
        grads.index_add_(0, hit_slots, grad_output.to(dtype).index_select(0, bag[hit]) * scale[hit].unsqueeze(1))
        touched = torch.unique(hit_slots)
        state = cache_optimizer_state[0] if cache_optimizer_state else None
        apply_rows_update_(cache_weight, state, touched, grads.index_select(0, touched), optimizer, learning_rate, eps)
    if miss_ids.numel():
        _ops.tt_embedding_bag_backward_fused_.default(
            grad_output, cores, optimizer_state, miss_ids, miss_offsets, miss_scale, p_shapes,
            q_shapes, ranks, num_embeddings, PoolingMode.SUM, optimizer, learning_rate, eps,
        )


for _name, _fn in (
    ("tt_cached_embedding_bag_forward", tt_cached_embedding_bag_forward),
    ("tt_cached_embedding_bag_backward_fused_", tt_cached_embedding_bag_backward_fused_),
):
    lib.impl(_name, _fn, "CompositeExplicitAutograd")
