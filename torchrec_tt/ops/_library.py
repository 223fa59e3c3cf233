"""The one place where the ``torchrec_tt`` operator schemas are defined.

Every op is declared here with :class:`torch.library.Library` so that it exists
even when the compiled extension ``torchrec_tt._C`` is absent. The pure-PyTorch
reference kernels are registered as the ``CompositeExplicitAutograd`` default in
:mod:`torchrec_tt.ops.reference`; the C++ (``csrc/``) and CUDA kernels add
``TORCH_LIBRARY_IMPL(torchrec_tt, CPU|CUDA, m)`` blocks that take precedence.

Conventions shared by all ops (see the README, "TT conventions"):

* ``cores[k]`` is the k-th TT core (0-based) in the *internal* layout
  ``[p_k, r_k * q_k * r_{k+1}]``: one contiguous slice per row digit, the slice
  itself row-major over ``(r_k, q_k, r_{k+1})``. ``ranks`` has ``d + 1`` entries
  with ``ranks[0] == ranks[d] == 1``.
* Row ``i`` has digits ``(i_0, ..., i_{d-1})`` in mixed radix ``p``, ``i_0`` the
  most significant; column ``j`` likewise in radix ``q``.
* ``offsets`` has ``B + 1`` entries, ``offsets[0] == 0``, non-decreasing,
  ``offsets[B] == indices.numel()``; bag ``b`` is
  ``indices[offsets[b]:offsets[b + 1]]``.
* ``pooling_mode``: ``0`` = sum, ``1`` = mean (the weighted sum divided by the
  bag length; an empty bag gives zeros). Same numbers as FBGEMM's ``PoolingMode``.
* ``optimizer`` (fused op): ``0`` = SGD, ``1`` = Adagrad, ``2`` = row-wise Adagrad
  (:class:`FusedOptimizer`).
"""

from __future__ import annotations

import enum

import torch

NAMESPACE = "torchrec_tt"

_COMMON_ARGS = (
    "Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
    "int[] p_shapes, int[] q_shapes, int[] ranks, int num_embeddings, "
    "int pooling_mode"
)

SCHEMAS: dict[str, str] = {
    # Pooled TT lookup: (B, D) output.
    "tt_embedding_bag_forward": f"tt_embedding_bag_forward(Tensor[] cores, {_COMMON_ARGS}) -> Tensor",
    # Gradients of the loss w.r.t. every core (dense, same shapes as cores).
    "tt_embedding_bag_backward": (
        f"tt_embedding_bag_backward(Tensor grad_output, Tensor[] cores, {_COMMON_ARGS}) -> Tensor[]"
    ),
    # Backward + exact optimizer update of the touched core slices, in place.
    "tt_embedding_bag_backward_fused_": (
        "tt_embedding_bag_backward_fused_(Tensor grad_output, Tensor(a!)[] cores, "
        f"Tensor(b!)[] optimizer_state, {_COMMON_ARGS}, int optimizer, "
        "float learning_rate, float eps) -> ()"
    ),
    # Pooled lookup through an LFU row cache: ids found in the sorted ``cache_ids`` read the
    # matching ``cache_weight`` row, the others the TT cores. Adds to the int64 ``stats``
    # (>= 5 entries): [0] lookups, [1] cache hits, [2] distinct ids served by the cores and,
    # with ``count``, [4] the ids that found no hash slot (the others counted in
    # ``hash_keys`` / ``hash_counts`` as lfu_cache_record_ does).
    "tt_cached_embedding_bag_forward": (
        "tt_cached_embedding_bag_forward(Tensor[] cores, Tensor cache_ids, Tensor cache_weight, "
        f"Tensor(a!) hash_keys, Tensor(b!) hash_counts, Tensor(c!) stats, {_COMMON_ARGS}, "
        "int max_probes, bool count) -> Tensor"
    ),
    # Its backward fused with the optimizer: hits train the cached rows (state
    # ``cache_optimizer_state``: [] for SGD, else one tensor), misses the cores.
    "tt_cached_embedding_bag_backward_fused_": (
        "tt_cached_embedding_bag_backward_fused_(Tensor grad_output, Tensor(a!)[] cores, "
        "Tensor(b!)[] optimizer_state, Tensor cache_ids, Tensor(c!) cache_weight, "
        f"Tensor(d!)[] cache_optimizer_state, {_COMMON_ARGS}, int optimizer, float learning_rate, "
        "float eps) -> ()"
    ),
    # LFU cache: count one access of every id in an open-addressing hash table (linear
    # probing, at most max_probes slots); returns the number of ids left uncounted (1-elem).
    "lfu_cache_record_": (
        "lfu_cache_record_(Tensor(a!) hash_keys, Tensor(b!) hash_counts, Tensor ids, int max_probes) -> Tensor"
    ),
    # Materialise individual rows: (N, D) for N ids.
    "tt_lookup_rows": (
        "tt_lookup_rows(Tensor[] cores, Tensor indices, int[] p_shapes, "
        "int[] q_shapes, int[] ranks, int num_embeddings) -> Tensor"
    ),
}


class PoolingMode(enum.IntEnum):
    """Pooling of a bag, with FBGEMM's numbering."""

    SUM = 0
    MEAN = 1


class FusedOptimizer(enum.IntEnum):
    """Optimizers the fused backward op applies (exact: duplicates coalesced)."""

    SGD = 0
    ADAGRAD = 1
    ROWWISE_ADAGRAD = 2


lib = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901
for _schema in SCHEMAS.values():
    lib.define(_schema)
