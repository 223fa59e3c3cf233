"""LFU software cache of hot rows for TT tables.

A :class:`TTRowCache` holds ``cache_size`` rows of a TT table as plain
``(cache_size, D)`` tensors. Looked-up ids that are cached are served (and
trained, with the table's fused optimizer) from these rows without any TT
computation; the others go through the TT kernels. Which rows are cached is
chosen by :meth:`TTRowCache.populate` from access counts kept in an
open-addressing hash table that every training lookup updates on the device.

Design (see the README, "Software cache"):

* **Counting.** ``hash_keys``/``hash_counts`` form a linear-probing table of
  ``hashtbl_size`` slots. An id probes at most ``max_probes`` slots from its
  home slot ``((id mod H) * 2654435761) mod H``; it is counted in the slot that
  holds it or in the first empty one it claims. When all probed slots hold
  other ids the table is full *for that id*: the occurrence is not counted and
  ``hash_dropped`` grows by one (FBTT drops such keys silently). A training
  lookup counts inside the cached forward op; :meth:`TTRowCache.record` (the op
  ``torchrec_tt::lfu_cache_record_``) counts ids outside a lookup. On CPU the
  probing is vectorised by probe round, concurrent claims of a slot going to the
  smallest id; on CUDA it is atomic compare-and-swap, one probe per run of equal ids in
  the sorted batch, counting its length (which of two ids contesting a slot wins can
  vary, the counts of stored ids are exact). Populate breaks count ties by id, so the cache
  contents do not depend on the table layout unless ids were dropped.
* **Lookup.** ``cache_ids`` is kept sorted, so finding an id is a binary search;
  no dense id-to-slot map of ``num_embeddings`` entries is stored. The ops
  ``tt_cached_embedding_bag_forward`` / ``tt_cached_embedding_bag_backward_fused_``
  serve and train hits and misses in one call. On CUDA it is one pass of the TT
  kernels: a hit sorts after every TT id, grouped by its slot, its row is copied from
  the cache instead of being contracted, and no host synchronisation happens (a
  cached training step can be captured in a CUDA graph). Elsewhere the reference
  kernel splits the lookup into hits and compacted misses.
* **Training.** Gradients of cached rows are summed per slot deterministically
  (no float atomics) and the fused optimizer (SGD, Adagrad, row-wise Adagrad)
  updates the rows exactly as it would update the rows of an uncompressed table;
  cached rows own their optimizer state.
* **Populate.** The ``cache_size`` most frequent ids (ties: smaller id first)
  become the cache. Rows that stay keep their trained values and state (FBTT
  overwrote them from the cores at every populate). New rows are materialised
  from the cores with zero optimizer state. Evicted rows follow the eviction
  policy: ``"writeback"`` fits the TT cores to the evicted rows' trained values
  by least squares (:func:`fit_tt_rows_`, a few CGLS iterations per core, so
  what a cached row learned flows back into the cores), ``"discard"`` drops
  them, as the TT-Rec paper and FBTT do.

Example::

    >>> from torchrec_tt.ops import FusedOptimizer
    >>> cache = TTRowCache(cache_size=2, embedding_dim=4, hashtbl_size=16, optimizer=FusedOptimizer.SGD)
    >>> cache.record(torch.tensor([7, 7, 7, 3, 3, 5]))
    >>> cache.populate(lambda ids: torch.zeros(ids.numel(), 4), None)
    >>> cache.cache_ids.tolist()
    [3, 7]
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchrec_tt.ops import (
    FusedOptimizer,
    lfu_cache_record_,
    tt_cached_embedding_bag,
    tt_cached_embedding_bag_backward_fused_,
    tt_embedding_bag_backward,
    tt_embedding_bag_backward_fused_,
    tt_lookup_rows,
)
from torchrec_tt.ops.cached_reference import cache_slots
from torchrec_tt.ops.reference import LFU_EMPTY_KEY, lfu_home_slots
from torchrec_tt.ops.reference import lfu_cache_record_ as _lfu_insert
from torchrec_tt.ops.tt_embedding_bag import weights_grad_of_rows

logger = logging.getLogger(__name__)

__all__ = ["STAT_NAMES", "EvictionPolicy", "TTRowCache", "TTShape", "cache_statistics", "fit_tt_rows_", "populate_caches"]

EMPTY_ID = LFU_EMPTY_KEY
STAT_NAMES = ("lookups", "hits", "unique_misses", "evictions", "hash_dropped", "populates")
_MAX_HASHTBL_SIZE = 2**31


class EvictionPolicy(str, enum.Enum):
    """What happens to a trained cached row when :meth:`TTRowCache.populate` evicts it."""

    WRITEBACK = "writeback"
    DISCARD = "discard"


@dataclass(frozen=True)
class TTShape:
    """The TT shape arguments of the ops for one table (or table shard).

    Attributes:
        p_shapes, q_shapes, ranks (list[int]): the factorisation.
        num_embeddings (int): rows.
    """

    p_shapes: list[int]
    q_shapes: list[int]
    ranks: list[int]
    num_embeddings: int

    def args(self) -> tuple[list[int], list[int], list[int], int]:
        return self.p_shapes, self.q_shapes, self.ranks, self.num_embeddings


class TTRowCache(nn.Module):
    """LFU cache of hot rows of one TT table (or table shard).

    Args:
        cache_size (int): rows held (``> 0``).
        embedding_dim (int): columns of a row.
        hashtbl_size (int): slots of the frequency hash table (``0``: ``4 * cache_size``);
            at least ``cache_size``, below ``2**31``.
        optimizer (FusedOptimizer, optional): the fused optimizer that trains cached rows
            (``None``: the cache is read-only, for inference).
        eviction_policy (str): ``"writeback"`` (default) or ``"discard"``.
        max_probes (int): hash-table slots an id probes before it is dropped.
        populate_interval (int): :meth:`populate_due` says yes every this many
            training lookups (``0``: never; populate explicitly).
        count_decay (float): in ``[0, 1]``; after every populate the access counts are
            multiplied by it (rounded down), so the cache follows ids whose popularity
            changes; ids whose count reaches 0 leave the hash table (it is rebuilt), making
            room for new ones. ``1`` (default): pure LFU, counts never decay.
        name (str): table name used in errors and logs.
        device (torch.device, optional): where the cache lives.
        dtype (torch.dtype, optional): dtype of the cached rows (the cores' dtype).

    Example::

        >>> cache = TTRowCache(cache_size=4, embedding_dim=8)
        >>> cache.hashtbl_size, cache.cache_weight.shape
        (16, torch.Size([4, 8]))
    """

    def __init__(
        self,
        cache_size: int,
        embedding_dim: int,
        hashtbl_size: int = 0,
        optimizer: FusedOptimizer | None = None,
        eviction_policy: EvictionPolicy | str = EvictionPolicy.WRITEBACK,
        max_probes: int = 8,
        populate_interval: int = 0,
        count_decay: float = 1.0,
        name: str = "TTEmbeddingBag",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hashtbl_size = hashtbl_size or 4 * cache_size
        if cache_size <= 0:
            raise ValueError(f"table '{name}': use_cache=True needs cache_size > 0, got {cache_size}")
        if not cache_size <= hashtbl_size < _MAX_HASHTBL_SIZE:
            raise ValueError(
                f"table '{name}': hashtbl_size must be in [cache_size, 2**31) = [{cache_size}, {_MAX_HASHTBL_SIZE}), "
                f"got {hashtbl_size}"
            )
        if max_probes < 1:
            raise ValueError(f"table '{name}': cache max_probes must be >= 1, got {max_probes}")
        if populate_interval < 0:
            raise ValueError(f"table '{name}': cache populate_interval must be >= 0, got {populate_interval}")
        if not 0.0 <= count_decay <= 1.0:
            raise ValueError(f"table '{name}': cache count_decay must be in [0, 1], got {count_decay}")
        try:
            self.eviction_policy = EvictionPolicy(getattr(eviction_policy, "value", eviction_policy))
        except ValueError:
            raise ValueError(
                f"table '{name}': cache eviction policy must be one of {[p.value for p in EvictionPolicy]}, "
                f"got {eviction_policy!r}"
            ) from None
        self.name = name
        self.cache_size, self.hashtbl_size, self.embedding_dim = cache_size, hashtbl_size, embedding_dim
        self.max_probes = max_probes
        self.populate_interval = populate_interval
        self.count_decay = float(count_decay)
        self._lookups_since_populate = 0  # host mirror of the `populate_clock` buffer (no sync to read it)
        self.optimizer = optimizer
        i64 = {"device": device, "dtype": torch.int64}
        self.register_buffer("hash_keys", torch.full((hashtbl_size,), EMPTY_ID, **i64))
        self.register_buffer("hash_counts", torch.zeros(hashtbl_size, **i64))
        self.register_buffer("cache_ids", torch.full((cache_size,), EMPTY_ID, **i64))
        self.register_buffer("cache_weight", torch.zeros(cache_size, embedding_dim, device=device, dtype=dtype or torch.float32))
        state_shape = {FusedOptimizer.ADAGRAD: (cache_size, embedding_dim), FusedOptimizer.ROWWISE_ADAGRAD: (cache_size,)}
        if optimizer in state_shape:
            state_dtype = torch.promote_types(dtype or torch.float32, torch.float32)
            self.register_buffer("cache_optimizer_state", torch.zeros(state_shape[optimizer], device=device, dtype=state_dtype))
        self.register_buffer("stats", torch.zeros(len(STAT_NAMES), **i64))
        self.register_buffer("populate_clock", torch.zeros(1, **i64))  # training lookups since the last populate

    def populate_due(self) -> bool:
        """Count one training lookup; True when ``populate_interval`` lookups have passed since the last populate."""
        if not self.populate_interval:
            return False
        self._lookups_since_populate += 1
        self.populate_clock.add_(1)
        return self._lookups_since_populate > self.populate_interval

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._lookups_since_populate = int(self.populate_clock[0]) if self.populate_clock.device.type != "meta" else 0

    @classmethod
    def buffer_layout(
        cls, cache_size: int, embedding_dim: int, hashtbl_size: int = 0, optimizer: FusedOptimizer | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, tuple[int, torch.dtype]]:
        """``{buffer name: (numel, dtype)}`` of a cache with these settings (built on meta, no memory).

        Example::

            >>> TTRowCache.buffer_layout(4, 8)["cache_weight"]
            (32, torch.float32)
        """
        probe = cls(cache_size, embedding_dim, hashtbl_size, optimizer, device="meta", dtype=dtype)
        return {name: (buf.numel(), buf.dtype) for name, buf in probe.named_buffers()}

    def empty_state(self) -> dict[str, Tensor]:
        """Buffers of an empty cache with no counts and zero statistics (new tensors, by buffer name)."""
        fresh = {name: torch.zeros_like(buf) for name, buf in self.named_buffers()}
        fresh["hash_keys"] = torch.full_like(self.hash_keys, EMPTY_ID)
        fresh["cache_ids"] = torch.full_like(self.cache_ids, EMPTY_ID)
        return fresh

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, float]:
        """Counters since the last :meth:`reset_statistics` (one host sync, only when called).

        Returns:
            dict: ``lookups``, ``hits``, ``unique_misses`` (summed per lookup call),
            ``evictions``, ``hash_dropped`` (occurrences not counted because all
            probed slots were taken), ``populates``, ``hit_rate`` and ``occupancy``
            (cached rows / ``cache_size``).
        """
        values = dict(zip(STAT_NAMES, self.stats.tolist(), strict=True))
        out: dict[str, float] = {k: float(v) for k, v in values.items()}
        out["hit_rate"] = values["hits"] / values["lookups"] if values["lookups"] else 0.0
        out["occupancy"] = float((self.cache_ids != EMPTY_ID).sum()) / self.cache_size
        return out

    def reset_statistics(self) -> None:
        """Zero the counters (not the access frequencies)."""
        self.stats.zero_()

    def _bump(self, stat: str, value: Tensor | int) -> None:
        self.stats[STAT_NAMES.index(stat)] += value

    # ------------------------------------------------------------------ counting
    def _home_slots(self, ids: Tensor) -> Tensor:
        return lfu_home_slots(ids, self.hashtbl_size)

    @torch.no_grad()
    def record(self, ids: Tensor) -> None:
        """Count one access of every id (duplicates count once each); no host sync.

        Args:
            ids (Tensor): 1-D non-negative ids.
        """
        ids = ids.reshape(-1)
        if ids.numel():
            self._bump("hash_dropped", lfu_cache_record_(self.hash_keys, self.hash_counts, ids, self.max_probes)[0])

    # ------------------------------------------------------------------ lookup
    def lookup(
        self,
        cores: list[Tensor],
        shape: TTShape,
        ids: Tensor,
        offsets: Tensor,
        weights: Tensor | None,
        pooling_mode: int,
        count: bool,
        for_backward: bool = False,
    ) -> Tensor:
        """Pooled lookup, cached ids from the cached rows and the others from ``cores``.

        Updates ``lookups``, ``hits``, ``unique_misses`` (and, counting, ``hash_dropped``) on
        the device, in the same op (no host sync).

        Args:
            cores (list[Tensor]): the table's TT cores.
            shape (TTShape): their shape arguments.
            ids (Tensor): 1-D int32/int64 ids in ``[0, num_embeddings)``.
            offsets (Tensor): ``B + 1`` bag boundaries.
            weights (Tensor, optional): per-sample weights.
            pooling_mode (int): 0 (sum) or 1 (mean).
            count (bool): record the ids' accesses for :meth:`populate` (training).
            for_backward (bool): :meth:`fused_backward_` of the same tensors follows.

        Returns:
            Tensor: ``(B, D)``.
        """
        return tt_cached_embedding_bag(
            cores, self.cache_ids, self.cache_weight, self.hash_keys, self.hash_counts, self.stats, ids, offsets,
            weights, *shape.args(), pooling_mode, self.max_probes, count, for_backward,
        )

    def _acc_dtype(self) -> torch.dtype:
        return torch.promote_types(self.cache_weight.dtype, torch.float32)

    def weights_grad(
        self, grad_output: Tensor, cores: list[Tensor], shape: TTShape, ids: Tensor, offsets: Tensor, pooling_mode: int
    ) -> Tensor:
        """Gradient w.r.t. per-sample weights: ``<grad_output[bag], row>`` per id, the row cached or not."""
        rows = self.overlay(ids, tt_lookup_rows(cores, ids, *shape.args())).to(self._acc_dtype())
        return weights_grad_of_rows(grad_output.to(rows.dtype), rows, offsets, pooling_mode)

    # ------------------------------------------------------------------ training
    def _require_optimizer(self) -> FusedOptimizer:
        if self.optimizer is None:
            raise RuntimeError(f"table '{self.name}': the cache has no fused optimizer to train its rows")
        return self.optimizer

    def _states(self) -> list[Tensor]:
        state = self._buffers.get("cache_optimizer_state")
        return [] if state is None else [state]

    @torch.no_grad()
    def fused_backward_(
        self,
        grad_output: Tensor,
        cores: list[Tensor],
        core_states: list[Tensor],
        shape: TTShape,
        ids: Tensor,
        offsets: Tensor,
        weights: Tensor | None,
        pooling_mode: int,
        learning_rate: float,
        eps: float,
    ) -> None:
        """Fused optimizer step of a :meth:`lookup`: the hit cached rows and the cores (for the misses).

        Duplicates are coalesced in a fixed order (no float atomics on CUDA: same input, same
        bits); the cached rows take exactly the step an uncompressed table's rows would take.

        Args:
            grad_output (Tensor): ``(B, D)`` gradient of the pooled output.
            cores, shape, ids, offsets, weights, pooling_mode: as in :meth:`lookup`.
            core_states (list[Tensor]): the cores' optimizer state.
            learning_rate (float): step size.
            eps (float): Adagrad's denominator term.
        """
        tt_cached_embedding_bag_backward_fused_(
            grad_output, cores, core_states, self.cache_ids, self.cache_weight, self._states(), ids, offsets, weights,
            *shape.args(), pooling_mode, int(self._require_optimizer()), learning_rate, eps,
        )

    @torch.no_grad()
    def update_hits_(
        self, grad_output: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None, pooling_mode: int,
        learning_rate: float, eps: float, miss_dtype: torch.dtype,
    ) -> Tensor:
        """Fused optimizer step of the hit cached rows only (for shards whose cores are trained elsewhere).

        The cached rows are a one-core TT table (``p=[cache_size], q=[D]``): every id is looked up
        there as its slot, the misses with weight 0 (their zero gradient leaves the row they land
        on exactly as it is), so the step needs no host sync.

        Returns:
            Tensor: per-sample weights in ``miss_dtype`` that drop the cached ids (0) and keep the
            others: the cores' backward with them sees the misses only.
        """
        slot, hit = cache_slots(self.cache_ids, ids)
        keep = _weights_or_ones(weights, ids, self._acc_dtype())
        tt_embedding_bag_backward_fused_(
            grad_output, [self.cache_weight], self._states(), slot, offsets, torch.where(hit, keep, torch.zeros_like(keep)),
            [self.cache_size], [self.embedding_dim], [1, 1], self.cache_size, pooling_mode,
            int(self._require_optimizer()), learning_rate, eps,
        )
        keep = _weights_or_ones(weights, ids, miss_dtype)
        return torch.where(hit, torch.zeros_like(keep), keep)

    # ------------------------------------------------------------------ populate / flush
    @torch.no_grad()
    def populate(
        self,
        lookup_rows: Callable[[Tensor], Tensor],
        writeback: Callable[[Tensor, Tensor], None] | None,
    ) -> None:
        """Cache the ``cache_size`` most frequently counted ids.

        Args:
            lookup_rows (callable): ids -> ``(n, D)`` rows from the TT cores.
            writeback (callable, optional): ``(ids, trained_rows)`` -> None, called
                with the evicted rows first when the policy is ``"writeback"``.
        """
        keys, counts = self.hash_keys, self.hash_counts
        score = torch.where(keys != EMPTY_ID, counts, torch.full_like(counts, -1))
        by_id = torch.argsort(keys, stable=True)
        by_count = torch.argsort(score.index_select(0, by_id), descending=True, stable=True)
        top = by_id.index_select(0, by_count[: self.cache_size])
        new_ids = torch.where(score.index_select(0, top) > 0, keys.index_select(0, top), EMPTY_ID)
        if new_ids.numel() < self.cache_size:
            new_ids = torch.cat([new_ids, new_ids.new_full((self.cache_size - new_ids.numel(),), EMPTY_ID)])
        self._replace(torch.sort(new_ids).values, lookup_rows, writeback)
        if self.count_decay < 1.0:
            self._decay_counts()

    @torch.no_grad()
    def _decay_counts(self) -> None:
        """Multiply the counts by ``count_decay`` (rounded down) and rebuild the table.

        The ids still counted are re-inserted into an emptied table (a slot cannot be freed
        in place: it may sit inside another id's probe run). An id that finds no slot within
        ``max_probes`` is dropped and counted in ``hash_dropped``.
        """
        counts = torch.floor(self.hash_counts.double() * self.count_decay).long()
        alive = (self.hash_keys != EMPTY_ID) & (counts > 0)
        ids, kept_counts = self.hash_keys[alive], counts[alive]
        order = torch.argsort(ids)
        ids, kept_counts = ids[order], kept_counts[order]
        self.hash_keys.fill_(EMPTY_ID)
        self.hash_counts.zero_()
        if ids.numel() == 0:
            return
        dropped = _lfu_insert(self.hash_keys, self.hash_counts, ids, self.max_probes)  # smallest id first per round
        # each placed id gets its decayed count back (found in the sorted survivors)
        slot, placed = cache_slots(ids, self.hash_keys)
        self.hash_counts.copy_(torch.where(placed, kept_counts.index_select(0, slot), 0))
        self._bump("hash_dropped", dropped[0])

    @torch.no_grad()
    def flush(self, writeback: Callable[[Tensor, Tensor], None] | None) -> None:
        """Evict every cached row (per the policy) and leave the cache empty.

        After a flush with ``"writeback"`` the cores alone hold the model (e.g. before
        exporting it or loading it into a table without a cache).

        Args:
            writeback (callable, optional): as in :meth:`populate`.
        """
        self._replace(torch.full_like(self.cache_ids, EMPTY_ID), lambda ids: self.cache_weight[:0], writeback)

    def _replace(
        self, new_ids: Tensor, lookup_rows: Callable[[Tensor], Tensor], writeback: Callable[[Tensor, Tensor], None] | None
    ) -> None:
        old_ids, last = self.cache_ids, self.cache_size - 1
        valid = new_ids != EMPTY_ID
        pos_old = torch.searchsorted(old_ids, new_ids).clamp_(max=last)
        kept = valid & (old_ids.index_select(0, pos_old) == new_ids)
        pos_new = torch.searchsorted(new_ids, old_ids).clamp_(max=last)
        evicted = torch.nonzero((old_ids != EMPTY_ID) & (new_ids.index_select(0, pos_new) != old_ids)).squeeze(1)
        if evicted.numel() and self.eviction_policy == EvictionPolicy.WRITEBACK and writeback is not None:
            writeback(old_ids.index_select(0, evicted), self.cache_weight.index_select(0, evicted))
        fresh = torch.nonzero(valid & ~kept).squeeze(1)
        weight = torch.where(kept.unsqueeze(1), self.cache_weight.index_select(0, pos_old), 0).to(self.cache_weight.dtype)
        if fresh.numel():
            weight.index_copy_(0, fresh, lookup_rows(new_ids.index_select(0, fresh)).to(weight.dtype))
        if hasattr(self, "cache_optimizer_state"):
            state = self.cache_optimizer_state
            keep = kept.view(-1, *([1] * (state.dim() - 1)))
            state.copy_(torch.where(keep, state.index_select(0, pos_old), 0))
        self.cache_weight.copy_(weight)
        self.cache_ids.copy_(new_ids)
        self.populate_clock.zero_()
        self._lookups_since_populate = 0
        self._bump("evictions", evicted.numel())
        self._bump("populates", 1)
        logger.debug(
            "cache of '%s': %d rows kept, %d new, %d evicted (%s)",
            self.name, int(kept.sum()), fresh.numel(), evicted.numel(), self.eviction_policy.value,
        )

    def overlay(self, ids: Tensor, rows: Tensor) -> Tensor:
        """``rows`` of ``ids`` with the cached ones replaced by their cached values."""
        slot, hit = cache_slots(self.cache_ids, ids)
        return torch.where(hit.unsqueeze(1), self.cache_weight.index_select(0, slot).to(rows.dtype), rows)

    def extra_repr(self) -> str:
        return (
            f"cache_size={self.cache_size}, hashtbl_size={self.hashtbl_size}, max_probes={self.max_probes}, "
            f"eviction_policy={self.eviction_policy.value!r}, count_decay={self.count_decay}"
        )


def _weights_or_ones(weights: Tensor | None, ids: Tensor, dtype: torch.dtype) -> Tensor:
    return weights.to(dtype) if weights is not None else torch.ones(ids.numel(), device=ids.device, dtype=dtype)


def _cache_owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "cache", None), TTRowCache) and hasattr(m, "cache_populate")]


def populate_caches(model: nn.Module) -> int:
    """Call ``cache_populate()`` on every cached TT table (or local table shard) in ``model``.

    Works on plain modules and on ``DistributedModelParallel`` models (each rank
    refreshes the caches of its own shards; no collective is involved).

    Args:
        model (nn.Module): any module tree.

    Returns:
        int: number of caches refreshed.

    Example::

        >>> from torchrec_tt import TTEmbeddingBag
        >>> model = nn.ModuleList([TTEmbeddingBag(100, 8, None, None, [4], sparse=True, use_cache=True, cache_size=2)])
        >>> populate_caches(model)
        1
    """
    owners = _cache_owners(model)
    for owner in owners:
        owner.cache_populate()
    return len(owners)


def cache_statistics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Statistics of every cache in ``model`` by cache name (one host sync per cache).

    Args:
        model (nn.Module): any module tree.

    Returns:
        dict: ``{cache name: TTRowCache.statistics()}``.

    Example::

        >>> from torchrec_tt import TTEmbeddingBag
        >>> t = TTEmbeddingBag(100, 8, None, None, [4], sparse=True, use_cache=True, cache_size=2, name="t0")
        >>> cache_statistics(t)["t0"]["lookups"]
        0.0
    """
    return {owner.cache.name: owner.cache.statistics() for owner in _cache_owners(model)}


@torch.no_grad()
def fit_tt_rows_(
    cores: Sequence[Tensor],
    ids: Tensor,
    targets: Tensor,
    p_shapes: list[int],
    q_shapes: list[int],
    ranks: list[int],
    num_embeddings: int,
    core_indices: Sequence[int] | None = None,
    sweeps: int = 2,
    cg_iters: int = 4,
) -> tuple[float, float]:
    """Move TT cores so that rows ``ids`` approach ``targets`` (least squares, in place).

    A row is linear in each core, so with the other cores fixed the best change of
    core ``k`` solves a linear least-squares problem ``min ||J_k X - R||``
    (``R`` the residual ``targets - rows``). CGLS solves it with the TT kernels
    only: ``J_k X`` is a row lookup with core ``k`` replaced by ``X`` and
    ``J_k^T R`` is the lookup's backward. ``sweeps`` passes over
    ``core_indices``, ``cg_iters`` CGLS iterations per core. Only core slices the
    ids touch move.

    Args:
        cores (list[Tensor]): the TT cores (internal layout), updated in place.
        ids (Tensor): 1-D row ids (distinct).
        targets (Tensor): ``(len(ids), D)`` desired rows.
        p_shapes, q_shapes, ranks, num_embeddings: the TT shape.
        core_indices (list[int], optional): cores allowed to move (default: all).
        sweeps (int): passes over the cores.
        cg_iters (int): CGLS iterations per core and pass.

    Returns:
        tuple[float, float]: residual Frobenius norm before and after.

    Example::

        >>> cores = [torch.randn(4, 1 * 2 * 3), torch.randn(5, 3 * 2 * 1)]
        >>> target = torch.randn(2, 4)
        >>> before, after = fit_tt_rows_(cores, torch.tensor([3, 17]), target, [4, 5], [2, 2], [1, 3, 1], 20)
        >>> after < before
        True
    """
    shape = (list(p_shapes), list(q_shapes), list(ranks), num_embeddings)
    cores = list(cores)
    targets = targets.to(cores[0].dtype)
    offsets = torch.arange(ids.numel() + 1, device=ids.device, dtype=ids.dtype)

    def apply_j(k: int, x: Tensor) -> Tensor:
        return tt_lookup_rows([x if j == k else c for j, c in enumerate(cores)], ids, *shape)

    def apply_jt(k: int, r: Tensor) -> Tensor:
        return tt_embedding_bag_backward(r.contiguous(), cores, ids, offsets, None, *shape, 0)[k]

    residual = targets - tt_lookup_rows(cores, ids, *shape)
    before = float(residual.norm())
    tiny = torch.finfo(cores[0].dtype).tiny
    for _ in range(sweeps):
        for k in core_indices if core_indices is not None else range(len(cores)):
            x = torch.zeros_like(cores[k])
            s = apply_jt(k, residual)
            direction, gamma = s, (s * s).sum()
            for _ in range(cg_iters):
                jd = apply_j(k, direction)
                alpha = gamma / (jd * jd).sum().clamp_min(tiny)
                x.add_(alpha * direction)
                residual = residual - alpha * jd
                s = apply_jt(k, residual)
                gamma_next = (s * s).sum()
                direction = s + gamma_next / gamma.clamp_min(tiny) * direction
                gamma = gamma_next
            cores[k].add_(x)
            residual = targets - tt_lookup_rows(cores, ids, *shape)
    return before, float(residual.norm())
