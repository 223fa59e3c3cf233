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
  ``hash_dropped`` grows by one (FBTT drops such keys silently). The op
  ``torchrec_tt::lfu_cache_record_`` does it: on CPU vectorised by probe round,
  concurrent claims of a slot going to the smallest id; on CUDA one kernel with
  atomic compare-and-swap (which of two ids contesting a slot wins can vary, the
  counts of stored ids are exact). Populate breaks count ties by id, so the cache
  contents do not depend on the table layout unless ids were dropped.
* **Lookup.** ``cache_ids`` is kept sorted, so a lookup is a ``searchsorted``;
  no dense id-to-slot map of ``num_embeddings`` entries is stored. Cached rows
  are a one-core TT table (``p=[cache_size], q=[D]``) pooled by the same kernels;
  hits and misses are compacted into two lookups, which costs one host
  synchronisation per lookup (the number of hits sizes both); ``TTRowCache.sync_free
  = True`` pads both parts to the input's size instead (no sync, slower).
* **Training.** Gradients of cached rows are summed per slot deterministically
  (the fused TT backward op on the one-core cache table, no float atomics) and the fused optimizer
  (SGD, Adagrad, row-wise Adagrad) updates the rows exactly as it would update
  the rows of an uncompressed table; cached rows own their optimizer state.
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
    per_sample_weights_grad,
    tt_embedding_bag,
    tt_embedding_bag_backward,
    tt_embedding_bag_backward_fused_,
    tt_embedding_bag_for_backward,
    tt_lookup_rows,
)
from torchrec_tt.ops.reference import LFU_EMPTY_KEY, check_bag_args, lfu_home_slots

logger = logging.getLogger(__name__)

__all__ = ["STAT_NAMES", "BagPart", "CacheSplit", "EvictionPolicy", "TTRowCache", "cache_statistics", "fit_tt_rows_", "populate_caches"]

EMPTY_ID = LFU_EMPTY_KEY
STAT_NAMES = ("lookups", "hits", "unique_misses", "evictions", "hash_dropped", "populates")
_MAX_HASHTBL_SIZE = 2**31


class EvictionPolicy(str, enum.Enum):
    """What happens to a trained cached row when :meth:`TTRowCache.populate` evicts it."""

    WRITEBACK = "writeback"
    DISCARD = "discard"


@dataclass
class BagPart:
    """The part of a lookup that one table (the cache or the TT cores) serves, compacted.

    Attributes:
        pos (Tensor): positions of its ids in the input, ascending.
        ids (Tensor): its ids (cache slots for the cached part, table ids for the TT part).
        offsets (Tensor): ``B + 1`` bag boundaries of ``ids`` (every input bag, maybe empty).
        weights (Tensor): pooling weight of every id (per-sample weight, divided by the bag
            length for mean pooling): the part is pooled as a weighted sum.
        num_bags (int): the input's bags; on GPU ``offsets`` has ``num_dummy_bags`` more.
        num_dummy_bags (int): with ``TTRowCache.sync_free`` the part keeps the input's size (no
            host sync to learn its count): ``ids`` is padded with id 0 of weight 0, and the
            padding fills extra bags after the real ones, whose pooled rows are dropped (and
            whose gradient is 0).
    """

    pos: Tensor
    ids: Tensor
    offsets: Tensor
    weights: Tensor
    num_bags: int
    num_dummy_bags: int = 0

    def real_bags(self, pooled: Tensor) -> Tensor:
        """The pooled rows of the input's bags (the dummy bags' rows dropped)."""
        return pooled[: self.num_bags] if self.num_dummy_bags else pooled

    def padded_grad(self, grad_output: Tensor) -> Tensor:
        """``grad_output`` with zero rows for the dummy bags."""
        if not self.num_dummy_bags:
            return grad_output
        return torch.cat([grad_output, grad_output.new_zeros(self.num_dummy_bags, grad_output.shape[1])])


@dataclass
class CacheSplit:
    """One lookup split into cached hits and TT misses (kept for the backward).

    Attributes:
        hits (BagPart): ids served by the cache (``ids`` are cache slots).
        misses (BagPart): ids served by the TT cores.
        offsets (Tensor): the input's ``B + 1`` bag boundaries (int64).
        mean (bool): whether the pooling is a mean.
    """

    hits: BagPart
    misses: BagPart
    offsets: Tensor
    mean: bool


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
        name (str): table name used in errors and logs.
        device (torch.device, optional): where the cache lives.
        dtype (torch.dtype, optional): dtype of the cached rows (the cores' dtype).

    Example::

        >>> cache = TTRowCache(cache_size=4, embedding_dim=8)
        >>> cache.hashtbl_size, cache.cache_weight.shape
        (16, torch.Size([4, 8]))
    """

    #: Split lookups without a host sync, the hit and miss parts padded to the input's size
    #: (CUDA-graph capturable). Off by default: measured on an H200 it is slower (the padding
    #: is one long run of id 0 for the kernels' segmented reductions), see benchmarks/NOTES.md.
    sync_free: bool = False

    def __init__(
        self,
        cache_size: int,
        embedding_dim: int,
        hashtbl_size: int = 0,
        optimizer: FusedOptimizer | None = None,
        eviction_policy: EvictionPolicy | str = EvictionPolicy.WRITEBACK,
        max_probes: int = 8,
        populate_interval: int = 0,
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
    def split(
        self, ids: Tensor, offsets: Tensor, weights: Tensor | None, mean: bool, num_embeddings: int, for_backward: bool = False
    ) -> tuple[CacheSplit, Tensor]:
        """Validate a lookup, separate cached hits from TT misses and pool the hits.

        Args:
            ids (Tensor): 1-D int32/int64 ids in ``[0, num_embeddings)``.
            offsets (Tensor): ``B + 1`` bag boundaries.
            weights (Tensor, optional): per-sample weights.
            mean (bool): mean pooling (the misses are then returned as a weighted sum
                with weights divided by the bag length).
            num_embeddings (int): rows of the table.
            for_backward (bool): :meth:`apply_update` follows (inside an autograd
                Function's forward): the hits are pooled by
                :func:`~torchrec_tt.ops.tt_embedding_bag_for_backward`.

        Returns:
            tuple: the :class:`CacheSplit` and the pooled cached rows ``(B, D)``.

        Raises:
            IndexError / ValueError: bad ids or offsets (nothing is counted then).
        """
        op = f"table '{self.name}' (cached lookup)"
        malformed = ids.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1 or ids.dtype not in (torch.int32, torch.int64)
        if malformed or weights is not None and (weights.dim() != 1 or weights.numel() != ids.numel()):
            check_bag_args(op, ids, offsets, weights, num_embeddings, 0)  # raises, naming the argument
        offs = offsets.long()
        lengths = offs[1:] - offs[:-1]
        nnz = ids.numel()
        ids64 = ids.long()
        slot = torch.searchsorted(self.cache_ids, ids64).clamp_(max=self.cache_size - 1)
        hit = self.cache_ids.index_select(0, slot) == ids64
        num_hits: int | Tensor
        sync_free = self.sync_free
        if ids.device.type == "cpu":
            bad = ((ids64 < 0) | (ids64 >= num_embeddings)).sum() + (lengths < 0).sum() + (offs[0] != 0) + (offs[-1] != nnz)
            num_hits, num_bad = torch.stack([hit.sum(), bad]).tolist()
            if num_bad:
                check_bag_args(op, ids, offsets, weights, num_embeddings, 0)
                raise ValueError(f"{op}: malformed ids or offsets")  # pragma: no cover - check_bag_args names it
        else:
            # Ids and offsets are checked on the device by the TT kernels, as without a cache
            # (cached ids are valid). Unless sync_free, the hit count is the one host sync.
            num_hits = hit.sum()
        if sync_free and isinstance(num_hits, int):
            num_hits = hit.sum()  # a tensor: the two parts keep the input's size (see BagPart)
        if not sync_free and not isinstance(num_hits, int):
            num_hits = int(num_hits)
        bag_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths, output_size=nnz)
        acc = self._acc_dtype()
        scale = weights.to(acc) if weights is not None else torch.ones(nnz, device=ids.device, dtype=acc)
        if mean:
            scale = scale / lengths.clamp(min=1).index_select(0, bag_of).to(acc)
        hits = _compact(hit, num_hits, slot, offs, scale, self.cache_weight.dtype, offsets.dtype)
        misses = _compact(~hit, nnz - num_hits, ids, offs, scale, scale.dtype, offsets.dtype)
        self._bump("lookups", nnz)
        self._bump("hits", num_hits)
        if sync_free and nnz:
            keys = torch.sort(torch.where(hit, -1, ids64)).values  # hits sort first as -1
            self._bump("unique_misses", ((keys[1:] != keys[:-1]) & (keys[1:] >= 0)).sum() + (keys[0] >= 0))
        elif misses.ids.numel():
            keys = torch.sort(misses.ids).values
            self._bump("unique_misses", (keys[1:] != keys[:-1]).sum() + 1)
        return CacheSplit(hits, misses, offs, mean), hits.real_bags(self._pool(hits, for_backward))

    def _acc_dtype(self) -> torch.dtype:
        return torch.promote_types(self.cache_weight.dtype, torch.float32)

    def _table(self) -> tuple[list[Tensor], list[int], list[int], list[int], int]:
        """The cached rows as a one-core TT (``p=[C], q=[D]``), so the TT kernels pool and train them."""
        return [self.cache_weight], [self.cache_size], [self.embedding_dim], [1, 1], self.cache_size

    def _pool(self, hits: BagPart, for_backward: bool) -> Tensor:
        cores, p, q, ranks, n = self._table()
        pool = tt_embedding_bag_for_backward if for_backward else tt_embedding_bag
        return pool(cores, hits.ids, hits.offsets, hits.weights, p, q, ranks, n, 0)

    def hit_weight_grad(self, grad_output: Tensor, split: CacheSplit) -> Tensor:
        """``<grad_output[bag], cached row>`` for every element of ``split.hits`` (padding included)."""
        cores, p, q, ranks, n = self._table()
        grad = split.hits.padded_grad(grad_output)
        return per_sample_weights_grad(grad, cores, split.hits.ids, split.hits.offsets, p, q, ranks, n, 0)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def apply_update(self, grad_output: Tensor, split: CacheSplit, learning_rate: float, eps: float) -> None:
        """Fused optimizer step on the cached rows that the lookup hit.

        The cached rows are a one-core TT table (``p=[cache_size], q=[D]``), so the
        fused TT backward op does it: duplicates coalesced in a fixed order (no float
        atomics on CUDA: same input, same bits), then exactly the step an uncompressed
        table takes on those rows; rows without a hit are not touched.

        Args:
            grad_output (Tensor): ``(B, D)`` gradient of the pooled output.
            split (CacheSplit): the forward's split.
            learning_rate (float): step size.
            eps (float): Adagrad's denominator term.
        """
        if self.optimizer is None:
            raise RuntimeError(f"table '{self.name}': the cache has no fused optimizer to train its rows")
        if split.hits.ids.numel() == 0:
            return
        cores, p, q, ranks, n = self._table()
        states = [self.cache_optimizer_state] if hasattr(self, "cache_optimizer_state") else []
        tt_embedding_bag_backward_fused_(
            split.hits.padded_grad(grad_output), cores, states, split.hits.ids, split.hits.offsets, split.hits.weights, p, q, ranks, n, 0,
            int(self.optimizer), learning_rate, eps,
        )

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
        ids64 = ids.long()
        slot = torch.searchsorted(self.cache_ids, ids64).clamp_(max=self.cache_size - 1)
        hit = (self.cache_ids.index_select(0, slot) == ids64).unsqueeze(1)
        return torch.where(hit, self.cache_weight.index_select(0, slot).to(rows.dtype), rows)

    def extra_repr(self) -> str:
        return (
            f"cache_size={self.cache_size}, hashtbl_size={self.hashtbl_size}, max_probes={self.max_probes}, "
            f"eviction_policy={self.eviction_policy.value!r}"
        )


_MAX_DUMMY_BAGS = 1024


def _compact(
    mask: Tensor,
    count: int | Tensor,
    ids: Tensor,
    offsets: Tensor,
    scale: Tensor,
    dtype: torch.dtype,
    offsets_dtype: torch.dtype,
) -> BagPart:
    """The ids where ``mask`` holds, with their bag boundaries and pooling weights.

    ``count`` is their number: an int gives an exact-size part; a device tensor a part of
    the input's size, padded with id 0 of weight 0 spread over dummy bags after the real
    ones (no host sync; see :class:`BagPart`).
    """
    nnz, num_bags = mask.numel(), offsets.numel() - 1
    before = torch.zeros(nnz + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(mask, 0, out=before[1:])
    real = before.index_select(0, offsets)
    if isinstance(count, int):
        pos = torch.nonzero_static(mask, size=count).squeeze(1)
        return BagPart(pos, ids.index_select(0, pos), real.to(offsets_dtype), scale.index_select(0, pos).to(dtype), num_bags)
    pos = torch.nonzero_static(mask, size=nnz, fill_value=nnz).squeeze(1)
    part_ids = torch.cat([ids, ids.new_zeros(1)]).index_select(0, pos)
    weights = torch.cat([scale, scale.new_zeros(1)]).index_select(0, pos).to(dtype)
    dummy = max(1, min(_MAX_DUMMY_BAGS, nnz))
    steps = torch.arange(1, dummy + 1, device=mask.device)
    bounds = count + (nnz - count) * steps // dummy  # the padding, split evenly; the last one ends at nnz
    return BagPart(pos, part_ids, torch.cat([real, bounds]).to(offsets_dtype), weights, num_bags, dummy)


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
