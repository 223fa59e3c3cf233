"""Typed wrappers, fake kernels and autograd for the TT embedding-bag ops.

The wrappers are the Python API of the ops; the module
:class:`torchrec_tt.TTEmbeddingBag` calls them. The dispatcher picks the kernel:
C++/CUDA from ``torchrec_tt._C`` when it is loaded, the reference otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from torchrec_tt.ops import cached_reference, reference  # noqa: F401  (register the default kernels)
from torchrec_tt.ops._library import NAMESPACE

__all__ = [
    "lfu_cache_record_",
    "tt_cached_embedding_bag",
    "tt_cached_embedding_bag_backward_fused_",
    "tt_embedding_bag",
    "tt_embedding_bag_backward",
    "tt_embedding_bag_backward_fused_",
    "tt_embedding_bag_for_backward",
    "tt_lookup_rows",
]

_ops = getattr(torch.ops, NAMESPACE)


def tt_embedding_bag(
    cores: list[Tensor],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    pooling_mode: int = 0,
) -> Tensor:
    """Pooled TT embedding lookup, differentiable w.r.t. cores and weights.

    Args:
        cores (list[Tensor]): TT cores, core ``k`` of shape ``[p_k, r_k*q_k*r_{k+1}]``.
        indices (Tensor): 1-D int32/int64 row ids in ``[0, num_embeddings)``.
        offsets (Tensor): ``B + 1`` bag boundaries (``offsets[-1] == len(indices)``).
        per_sample_weights (Tensor, optional): one weight per id.
        p_shapes (list[int]): row factorisation, ``prod(p_shapes) >= num_embeddings``.
        q_shapes (list[int]): column factorisation, ``prod(q_shapes) == D``.
        ranks (list[int]): ``d + 1`` ranks, first and last 1.
        num_embeddings (int): number of valid rows.
        pooling_mode (int): 0 = sum, 1 = mean.

    Returns:
        Tensor: ``(B, D)`` pooled embeddings in the cores' dtype.

    Example::

        >>> cores = [torch.randn(2, 1 * 2 * 3), torch.randn(5, 3 * 2 * 1)]
        >>> out = tt_embedding_bag(
        ...     cores, torch.tensor([1, 9, 4]), torch.tensor([0, 2, 3]), None,
        ...     [2, 5], [2, 2], [1, 3, 1], 10)
        >>> out.shape
        torch.Size([2, 4])
    """
    return _ops.tt_embedding_bag_forward.default(
        cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode
    )


def tt_embedding_bag_for_backward(
    cores: list[Tensor],
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    pooling_mode: int = 0,
) -> Tensor:
    """:func:`tt_embedding_bag` for the forward of an ``autograd.Function`` that runs a TT backward op itself.

    The op runs below autograd (nothing is recorded; the caller's Function owns the
    backward) with grad mode on. Grad mode tells the CUDA kernels that a backward
    follows: they keep the sorted batch, and the backward op of the same ``indices``,
    ``offsets`` and ``per_sample_weights`` (same, unmodified tensors; any thread) takes
    it instead of sorting again. The other kernels ignore it.

    Args: as :func:`tt_embedding_bag`.

    Returns:
        Tensor: ``(B, D)``, without a ``grad_fn``.

    Example::

        >>> cores = [torch.randn(2, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)]
        >>> out = tt_embedding_bag_for_backward(
        ...     cores, torch.tensor([1, 9]), torch.tensor([0, 2]), None, [2, 5], [2, 2], [1, 3, 1], 10)
        >>> out.shape, out.requires_grad
        (torch.Size([1, 4]), False)
    """
    return _run_keeping_batch(
        _ops.tt_embedding_bag_forward.default,
        cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode,
    )


def _run_keeping_batch(op: Any, *args: Any) -> Tensor:
    """Runs a forward op below autograd with grad mode on (the CUDA kernels then keep the sorted batch).

    Under ``torch.compile`` the op runs as a plain call: traced, there is no kernel state to keep.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd(), torch.enable_grad():
        return op(*args)


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
    pooling_mode: int = 0,
) -> list[Tensor]:
    """Gradients of a loss w.r.t. every core, given ``grad_output`` ``(B, D)``.

    Args: as :func:`tt_embedding_bag`, plus ``grad_output`` (Tensor): ``(B, D)``.

    Returns:
        list[Tensor]: dense gradients, one per core, shaped like the cores.

    Example::

        >>> cores = [torch.randn(2, 6), torch.randn(5, 6)]
        >>> g = tt_embedding_bag_backward(
        ...     torch.ones(1, 4), cores, torch.tensor([3]), torch.tensor([0, 1]), None,
        ...     [2, 5], [2, 2], [1, 3, 1], 10)
        >>> [t.shape for t in g]
        [torch.Size([2, 6]), torch.Size([5, 6])]
    """
    return _ops.tt_embedding_bag_backward.default(
        grad_output, cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode
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
    """Backward fused with an exact optimizer step; mutates cores and state.

    Args: as :func:`tt_embedding_bag_backward`, plus
        optimizer_state (list[Tensor]): ``[]`` for SGD; per core the core's shape
            (Adagrad) or ``(p_k,)`` (row-wise Adagrad).
        optimizer (int): :class:`torchrec_tt.ops.FusedOptimizer`.
        learning_rate (float): step size.
        eps (float): Adagrad's denominator term.

    Example::

        >>> cores = [torch.randn(2, 6), torch.randn(5, 6)]
        >>> tt_embedding_bag_backward_fused_(
        ...     torch.ones(1, 4), cores, [], torch.tensor([3]), torch.tensor([0, 1]),
        ...     None, [2, 5], [2, 2], [1, 3, 1], 10, 0, 0, 0.1, 0.0)
    """
    _ops.tt_embedding_bag_backward_fused_.default(
        grad_output,
        cores,
        optimizer_state,
        indices,
        offsets,
        per_sample_weights,
        p_shapes,
        q_shapes,
        ranks,
        num_embeddings,
        pooling_mode,
        optimizer,
        learning_rate,
        eps,
    )


def tt_cached_embedding_bag(
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
    pooling_mode: int = 0,
    max_probes: int = 8,
    count: bool = False,
    for_backward: bool = False,
) -> Tensor:
    """Pooled lookup through an LFU row cache: cached ids read ``cache_weight``, the others the cores.

    One op, no host sync: it also updates the cache statistics and, with ``count``,
    counts the ids' accesses (as :func:`lfu_cache_record_`). Not differentiable by
    autograd: training runs :func:`tt_cached_embedding_bag_backward_fused_` (as the
    module :class:`torchrec_tt.TTEmbeddingBag` with ``use_cache=True`` does).

    Args: as :func:`tt_embedding_bag`, plus
        cache_ids (Tensor): sorted int64 cached ids (unused slots ``2**63 - 1``, at the end).
        cache_weight (Tensor): ``(len(cache_ids), D)`` cached rows, the cores' dtype.
        hash_keys, hash_counts (Tensor): the LFU frequency table (see :func:`lfu_cache_record_`).
        stats (Tensor): int64 counters (>= 5), added to in place: ``[0]`` lookups, ``[1]``
            hits, ``[2]`` distinct ids served by the cores, ``[4]`` ids left uncounted
            because every probed hash slot held another id (with ``count``).
        max_probes (int): hash slots an id probes before it is given up.
        count (bool): count the accesses (training lookups).
        for_backward (bool): the fused backward of the same tensors follows (see
            :func:`tt_embedding_bag_for_backward`): the CUDA kernels keep the sorted batch.

    Returns:
        Tensor: ``(B, D)`` pooled rows.

    Example::

        >>> cores = [torch.randn(2, 6), torch.randn(5, 6)]
        >>> keys, counts = torch.full((8,), 2**63 - 1), torch.zeros(8, dtype=torch.long)
        >>> stats = torch.zeros(6, dtype=torch.long)
        >>> out = tt_cached_embedding_bag(
        ...     cores, torch.tensor([4]), torch.zeros(1, 4), keys, counts, stats, torch.tensor([4, 9, 9]),
        ...     torch.tensor([0, 3]), None, [2, 5], [2, 2], [1, 3, 1], 10, count=True)
        >>> out.shape, stats.tolist(), int(counts.sum())
        (torch.Size([1, 4]), [3, 1, 1, 0, 0, 0], 3)
    """
    args = (cores, cache_ids, cache_weight, hash_keys, hash_counts, stats, indices, offsets, per_sample_weights,
            p_shapes, q_shapes, ranks, num_embeddings, pooling_mode, max_probes, count)
    if not for_backward:
        return _ops.tt_cached_embedding_bag_forward.default(*args)
    return _run_keeping_batch(_ops.tt_cached_embedding_bag_forward.default, *args)


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
    """Backward of :func:`tt_cached_embedding_bag` fused with an exact optimizer step (in place).

    The cached rows that the lookup hit take the step an uncompressed table's rows
    would take (their gradients summed first); the cores take the fused TT step for
    the other ids (as :func:`tt_embedding_bag_backward_fused_`).

    Args: as :func:`tt_embedding_bag_backward_fused_` and :func:`tt_cached_embedding_bag`, plus
        cache_optimizer_state (list[Tensor]): ``[]`` for SGD, else the cache's state:
            ``cache_weight``'s shape (Adagrad) or ``(len(cache_ids),)`` (row-wise Adagrad).

    Example::

        >>> cores, cache = [torch.randn(2, 6), torch.randn(5, 6)], torch.zeros(1, 4)
        >>> tt_cached_embedding_bag_backward_fused_(
        ...     torch.ones(1, 4), cores, [], torch.tensor([4]), cache, [], torch.tensor([4, 9]),
        ...     torch.tensor([0, 2]), None, [2, 5], [2, 2], [1, 3, 1], 10, 0, 0, 0.5, 0.0)
        >>> cache.tolist()
        [[-0.5, -0.5, -0.5, -0.5]]
    """
    _ops.tt_cached_embedding_bag_backward_fused_.default(
        grad_output, cores, optimizer_state, cache_ids, cache_weight, cache_optimizer_state, indices, offsets,
        per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode, optimizer, learning_rate, eps,
    )


def tt_lookup_rows(
    cores: list[Tensor], indices: Tensor, p_shapes: list[int], q_shapes: list[int], ranks: list[int], num_embeddings: int
) -> Tensor:
    """Materialise the rows ``indices`` of the TT table: ``(N, D)``.

    Args: as :func:`tt_embedding_bag`.

    Example::

        >>> cores = [torch.randn(2, 6), torch.randn(5, 6)]
        >>> tt_lookup_rows(cores, torch.arange(10), [2, 5], [2, 2], [1, 3, 1], 10).shape
        torch.Size([10, 4])
    """
    return _ops.tt_lookup_rows.default(cores, indices, p_shapes, q_shapes, ranks, num_embeddings)


def lfu_cache_record_(hash_keys: Tensor, hash_counts: Tensor, ids: Tensor, max_probes: int) -> Tensor:
    """Count one access of every id in an LFU hash table (in place); returns the uncounted ids (1 element).

    Args:
        hash_keys (Tensor): int64 keys, ``EMPTY = 2**63 - 1`` where free.
        hash_counts (Tensor): int64 counts, same shape.
        ids (Tensor): 1-D int32/int64 ids.
        max_probes (int): slots probed from an id's home slot before it is given up.

    Returns:
        Tensor: ``(1,)`` int64 count of ids whose probed slots all held other ids.

    Example::

        >>> keys = torch.full((8,), 2**63 - 1); counts = torch.zeros(8, dtype=torch.long)
        >>> lfu_cache_record_(keys, counts, torch.tensor([3, 3, 5]), 4).tolist()
        [0]
    """
    return _ops.lfu_cache_record_.default(hash_keys, hash_counts, ids, max_probes)


# --------------------------------------------------------------------------- fake kernels
def _fake_checks(cores: list[Tensor], q_shapes: list[int]) -> None:
    torch._check(len(cores) == len(q_shapes), lambda: "one q_shape per core")


@torch.library.register_fake(f"{NAMESPACE}::tt_embedding_bag_forward")
def _(cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode):
    _fake_checks(cores, q_shapes)
    return cores[0].new_empty(offsets.shape[0] - 1, math.prod(q_shapes))


@torch.library.register_fake(f"{NAMESPACE}::tt_embedding_bag_backward")
def _(grad_output, cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode):
    _fake_checks(cores, q_shapes)
    return [torch.empty_like(c) for c in cores]


@torch.library.register_fake(f"{NAMESPACE}::tt_embedding_bag_backward_fused_")
def _(grad_output, cores, optimizer_state, indices, offsets, per_sample_weights, *args):
    _fake_checks(cores, args[1])
    return None


@torch.library.register_fake(f"{NAMESPACE}::tt_cached_embedding_bag_forward")
def _(cores, cache_ids, cache_weight, hash_keys, hash_counts, stats, indices, offsets, per_sample_weights, p_shapes,
      q_shapes, *args):
    _fake_checks(cores, q_shapes)
    return cores[0].new_empty(offsets.shape[0] - 1, math.prod(q_shapes))


@torch.library.register_fake(f"{NAMESPACE}::tt_cached_embedding_bag_backward_fused_")
def _(grad_output, cores, optimizer_state, cache_ids, cache_weight, cache_optimizer_state, indices, offsets, *args):
    _fake_checks(cores, args[2])
    return None


@torch.library.register_fake(f"{NAMESPACE}::lfu_cache_record_")
def _(hash_keys, hash_counts, ids, max_probes):
    return hash_keys.new_empty(1)


@torch.library.register_fake(f"{NAMESPACE}::tt_lookup_rows")
def _(cores, indices, p_shapes, q_shapes, ranks, num_embeddings):
    _fake_checks(cores, q_shapes)
    return cores[0].new_empty(indices.shape[0], math.prod(q_shapes))


# --------------------------------------------------------------------------- autograd
def per_sample_weights_grad(
    grad_output: Tensor,
    cores: list[Tensor],
    indices: Tensor,
    offsets: Tensor,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    pooling_mode: int,
) -> Tensor:
    """Gradient w.r.t. ``per_sample_weights``: ``<grad_output[bag(i)], row(i)>`` (/ length for mean).

    Example::

        >>> cores = [torch.randn(2, 6), torch.randn(5, 6)]
        >>> per_sample_weights_grad(torch.ones(1, 4), cores, torch.tensor([3]),
        ...     torch.tensor([0, 1]), [2, 5], [2, 2], [1, 3, 1], 10, 0).shape
        torch.Size([1])
    """
    rows = tt_lookup_rows(cores, indices, p_shapes, q_shapes, ranks, num_embeddings)
    return weights_grad_of_rows(grad_output, rows, offsets, pooling_mode)


def weights_grad_of_rows(grad_output: Tensor, rows: Tensor, offsets: Tensor, pooling_mode: int) -> Tensor:
    """Gradient w.r.t. ``per_sample_weights`` given the looked-up rows: ``<grad_output[bag(i)], rows[i]>``.

    Args:
        grad_output (Tensor): ``(B, D)`` gradient of the pooled output.
        rows (Tensor): ``(N, D)`` row of every id.
        offsets (Tensor): ``B + 1`` bag boundaries.
        pooling_mode (int): 0 = sum, 1 = mean (divided by the bag length).

    Example::

        >>> weights_grad_of_rows(torch.ones(1, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 2]), 1)
        tensor([1.5000, 3.5000])
    """
    offs = offsets.long()
    lengths = offs[1:] - offs[:-1]
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=offs.device), lengths, output_size=rows.shape[0])
    grad = (grad_output.index_select(0, bag) * rows).sum(dim=1)
    if pooling_mode == 1:
        grad = grad / lengths.clamp(min=1).index_select(0, bag).to(grad.dtype)
    return grad


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode = inputs
    ctx.save_for_backward(indices, offsets, per_sample_weights, *cores)
    ctx.meta = (list(p_shapes), list(q_shapes), list(ranks), num_embeddings, pooling_mode)


def _backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
    indices, offsets, per_sample_weights, *cores = ctx.saved_tensors
    p_shapes, q_shapes, ranks, num_embeddings, pooling_mode = ctx.meta
    grad_output = grad_output.contiguous()
    core_grads = None
    if ctx.needs_input_grad[0]:
        core_grads = tt_embedding_bag_backward(
            grad_output, cores, indices, offsets, per_sample_weights, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode
        )
    weight_grad = None
    if per_sample_weights is not None and ctx.needs_input_grad[3]:
        weight_grad = per_sample_weights_grad(
            grad_output, cores, indices, offsets, p_shapes, q_shapes, ranks, num_embeddings, pooling_mode
        ).to(per_sample_weights.dtype)
    return core_grads, None, None, weight_grad, None, None, None, None, None


torch.library.register_autograd(
    f"{NAMESPACE}::tt_embedding_bag_forward", _backward, setup_context=_setup_context
)


def _rows_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    cores, indices, p_shapes, q_shapes, ranks, num_embeddings = inputs
    ctx.save_for_backward(indices, *cores)
    ctx.meta = (list(p_shapes), list(q_shapes), list(ranks), num_embeddings)


def _rows_backward(ctx: Any, grad_rows: Tensor) -> tuple[Any, ...]:
    indices, *cores = ctx.saved_tensors
    # Each row is its own bag of one id: the pooled backward gives the core gradients.
    offsets = torch.arange(indices.shape[0] + 1, device=indices.device, dtype=indices.dtype)
    core_grads = None
    if ctx.needs_input_grad[0]:
        core_grads = tt_embedding_bag_backward(grad_rows.contiguous(), cores, indices, offsets, None, *ctx.meta, 0)
    return core_grads, None, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::tt_lookup_rows", _rows_backward, setup_context=_rows_setup_context)


def _no_double_backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    raise NotImplementedError(
        "torchrec_tt.tt_embedding_bag_backward is not differentiable (double backward through a TT lookup is not supported)"
    )


def _no_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    return None


torch.library.register_autograd(f"{NAMESPACE}::tt_embedding_bag_backward", _no_double_backward, setup_context=_no_context)
