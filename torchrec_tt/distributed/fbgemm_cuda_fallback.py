"""Pure-PyTorch CUDA kernels for the fbgemm sparse ops on torchrec's pooled data path.

``fbgemm-gpu-cpu`` (the wheel a GPU box without FBGEMM's CUDA build has) registers
CPU and Meta kernels only, so torchrec's input dist fails on CUDA tensors with
"Could not run 'fbgemm::...' with arguments from the 'CUDA' backend". The TT
data path needs ``permute_2D_sparse_data`` (KJT permute / all-to-all) and
``block_bucketize_sparse_features`` (row-wise input dist); the column-wise output
needs ``permute_pooled_embs(_split)``. :func:`register_fbgemm_cuda_fallbacks`
registers the functions below for the ``CUDA`` key of every such op that has no
CUDA kernel yet (never overriding a real one).

The implementations are vectorised (``repeat_interleave`` with ``output_size``,
stable ``sort``, ``scatter_add``); the only host syncs are the output sizes of
``permute_*_sparse_data`` when ``permuted_lengths_sum`` is not given.
Supported: fixed batch size per feature (no VBE), no ``block_bucketize_pos`` /
``total_num_blocks`` (uneven or virtual row blocks) — those raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "FALLBACK_OPS",
    "asynchronous_complete_cumsum",
    "block_bucketize_sparse_features",
    "permute_1D_sparse_data",
    "permute_2D_sparse_data",
    "permute_pooled_embs",
    "register_fbgemm_cuda_fallbacks",
]

_LIBRARIES: list[torch.library.Library] = []


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def _gather_segments(starts: Tensor, seg_lens: Tensor, total: int | None = None) -> Tensor:
    """Indices concatenating ``[starts[i], starts[i] + seg_lens[i])`` over ``i``."""
    seg_lens = seg_lens.long()
    if total is None:
        total = int(seg_lens.sum())  # host sync
    rep_start = torch.repeat_interleave(starts.long(), seg_lens, output_size=total)
    rep_base = torch.repeat_interleave(_exclusive_cumsum(seg_lens), seg_lens, output_size=total)
    return rep_start + torch.arange(total, device=starts.device) - rep_base


def asynchronous_complete_cumsum(t_in: Tensor) -> Tensor:
    """``[0, cumsum(t_in)]`` (last dim), as fbgemm."""
    zeros = t_in.new_zeros((*t_in.shape[:-1], 1))
    return torch.cat([zeros, torch.cumsum(t_in, -1).to(t_in.dtype)], dim=-1)


def permute_2D_sparse_data(  # noqa: N802 - fbgemm's name
    permute: Tensor,
    lengths: Tensor,
    values: Tensor,
    weights: Tensor | None = None,
    permuted_lengths_sum: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reorder the feature rows of ``lengths`` ``[F, B]`` and their values / weights by ``permute``."""
    permute = permute.long()
    seg = lengths.sum(dim=1) if lengths.dim() == 2 else lengths
    starts = _exclusive_cumsum(seg.long())
    idx = _gather_segments(starts[permute], seg.long()[permute], permuted_lengths_sum)
    permuted_weights = weights.index_select(0, idx) if weights is not None else None
    return lengths.index_select(0, permute), values.index_select(0, idx), permuted_weights


def permute_1D_sparse_data(  # noqa: N802 - fbgemm's name
    permute: Tensor,
    lengths: Tensor,
    values: Tensor,
    weights: Tensor | None = None,
    permuted_lengths_sum: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``permute_2D_sparse_data`` over single bags."""
    out_lengths, out_values, out_weights = permute_2D_sparse_data(
        permute, lengths.view(-1, 1), values, weights, permuted_lengths_sum
    )
    return out_lengths.view(-1), out_values, out_weights


def expand_into_jagged_permute(permute: Tensor, input_offset: Tensor, output_offset: Tensor, output_size: int) -> Tensor:
    """Element-level permutation from a segment permutation (fbgemm semantics)."""
    seg = (output_offset[1:] - output_offset[:-1]).long()
    return _gather_segments(input_offset[permute.long()].long(), seg, int(output_size)).to(permute.dtype)


def block_bucketize_sparse_features(
    lengths: Tensor,
    indices: Tensor,
    bucketize_pos: bool,
    sequence: bool,
    block_sizes: Tensor,
    my_size: int,
    weights: Tensor | None = None,
    batch_size_per_feature: Tensor | None = None,
    max_B: int = -1,  # noqa: N803 - fbgemm's name
    block_bucketize_pos: list[Tensor] | None = None,
    keep_orig_idx: bool = False,
    total_num_blocks: Tensor | None = None,
    keep_orig_idx_per_feature: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Row-wise bucketization: id ``i`` of feature ``f`` goes to bucket ``i // block_sizes[f]`` (fixed batch)."""
    if batch_size_per_feature is not None or block_bucketize_pos is not None or total_num_blocks is not None:
        raise NotImplementedError(
            "torchrec_tt fbgemm CUDA fallback: block_bucketize_sparse_features supports a fixed batch size "
            "and even row blocks only (no batch_size_per_feature, block_bucketize_pos or total_num_blocks)"
        )
    device = indices.device
    num_features = block_sizes.numel()
    num_bags = lengths.numel()
    batch = num_bags // max(num_features, 1)
    lengths_l = lengths.long()
    bag_of = torch.repeat_interleave(torch.arange(num_bags, device=device), lengths_l, output_size=indices.numel())
    feature_of = torch.div(bag_of, max(batch, 1), rounding_mode="floor")
    block = block_sizes.to(device).long()[feature_of]
    idx = indices.long()
    in_range = idx < block * my_size
    bucket = torch.where(in_range, torch.div(idx, block, rounding_mode="floor"), idx % my_size)
    keep = keep_orig_idx
    if keep_orig_idx_per_feature is not None:
        keep_mask = keep_orig_idx_per_feature.to(device).bool()[feature_of]
        new_idx = torch.where(keep_mask, idx, torch.where(in_range, idx % block, torch.div(idx, my_size, rounding_mode="floor")))
    elif keep:
        new_idx = idx
    else:
        new_idx = torch.where(in_range, idx % block, torch.div(idx, my_size, rounding_mode="floor"))
    key = bucket * num_bags + bag_of  # output layout [bucket][feature][batch], order kept within a bag
    order = torch.sort(key, stable=True).indices
    new_lengths = torch.zeros(my_size * num_bags, dtype=torch.long, device=device)
    new_lengths.scatter_add_(0, key, torch.ones_like(key))
    new_indices = new_idx.index_select(0, order).to(indices.dtype)
    new_weights = weights.index_select(0, order) if weights is not None else None
    new_pos = None
    if bucketize_pos:
        pos = torch.arange(indices.numel(), device=device) - _exclusive_cumsum(lengths_l)[bag_of]
        new_pos = pos.index_select(0, order).to(indices.dtype)
    unbucketize_permute = None
    if sequence:
        unbucketize_permute = torch.empty_like(order)
        unbucketize_permute[order] = torch.arange(order.numel(), device=device)
        unbucketize_permute = unbucketize_permute.to(indices.dtype)
    return new_lengths.to(lengths.dtype), new_indices, new_weights, new_pos, unbucketize_permute


def segment_sum_csr(batch_size: int, csr_seg: Tensor, values: Tensor) -> Tensor:
    """Sums of ``values`` over segments of ``batch_size * (csr_seg[i+1] - csr_seg[i])`` elements."""
    seg = ((csr_seg[1:] - csr_seg[:-1]) * batch_size).long()
    ids = torch.repeat_interleave(torch.arange(seg.numel(), device=values.device), seg, output_size=values.numel())
    return torch.zeros(seg.numel(), dtype=values.dtype, device=values.device).index_add(0, ids, values)


def permute_pooled_embs(
    pooled_embs: Tensor, offset_dim_list: Tensor, permute_list: Tensor, inv_offset_dim_list: Tensor, inv_permute_list: Tensor
) -> Tensor:
    """Reorder column blocks of pooled embeddings ``(B, sum dims)`` (differentiable through index_select)."""
    offsets = offset_dim_list.long()
    perm = permute_list.long()
    cols = _gather_segments(offsets[perm], (offsets[1:] - offsets[:-1])[perm], pooled_embs.shape[1])
    return pooled_embs.index_select(1, cols)


FALLBACK_OPS: dict[str, Callable[..., object]] = {
    "asynchronous_complete_cumsum": asynchronous_complete_cumsum,
    "permute_2D_sparse_data": permute_2D_sparse_data,
    "permute_1D_sparse_data": permute_1D_sparse_data,
    "expand_into_jagged_permute": expand_into_jagged_permute,
    "block_bucketize_sparse_features": block_bucketize_sparse_features,
    "segment_sum_csr": segment_sum_csr,
    "permute_pooled_embs": permute_pooled_embs,
    "permute_pooled_embs_split": permute_pooled_embs,
    "permute_pooled_embs_auto_grad": permute_pooled_embs,
    "permute_pooled_embs_auto_grad_split": permute_pooled_embs,
}
"""fbgemm op name -> pure-PyTorch implementation (also usable directly, on any device)."""

AUTOGRAD_OPS = ("permute_pooled_embs_auto_grad", "permute_pooled_embs_auto_grad_split")
"""Ops whose fbgemm CPU build has an autograd kernel for CPU only (``AutogradCPU``): on CUDA their
backward would silently drop the gradient, so the fallback is also registered for ``AutogradCUDA``,
where autograd records the differentiable torch ops it is made of."""


def register_fbgemm_cuda_fallbacks(dispatch_key: str = "CUDA") -> list[str]:
    """Register :data:`FALLBACK_OPS` for ``dispatch_key`` where fbgemm has no kernel for it.

    Idempotent; ops that already have a kernel for the key (FBGEMM's CUDA build, or a
    previous call) are left alone.

    Args:
        dispatch_key (str): dispatch key to fill (``"CUDA"``).

    Returns:
        list[str]: the ops registered by this call.

    Example::

        >>> import torchrec  # loads fbgemm_gpu (the op schemas)
        >>> register_fbgemm_cuda_fallbacks()  # before the first sharded forward on CUDA
    """
    try:
        import fbgemm_gpu  # noqa: F401  (defines the fbgemm op schemas)
    except ImportError:
        logger.warning("fbgemm_gpu is not installed: no fbgemm ops to provide CUDA fallbacks for")
        return []
    registered = []
    lib = None
    for name, fn in FALLBACK_OPS.items():
        if not hasattr(torch.ops.fbgemm, name):
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"fbgemm::{name}", dispatch_key):
            continue
        if lib is None:
            lib = torch.library.Library("fbgemm", "IMPL")  # noqa: TOR901
        lib.impl(name, fn, dispatch_key)
        registered.append(name)
        autograd_key = f"Autograd{dispatch_key}"
        if name in AUTOGRAD_OPS and not any(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"fbgemm::{name}", k) for k in ("Autograd", autograd_key)
        ):
            lib.impl(name, fn, autograd_key)
            registered.append(f"{name} ({autograd_key})")
    if lib is not None:
        _LIBRARIES.append(lib)
        logger.info("torchrec_tt: pure-PyTorch %s kernels registered for fbgemm ops %s", dispatch_key, registered)
    return registered
