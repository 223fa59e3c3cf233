"""``TTEmbeddingBag``: a TT-compressed drop-in for ``torch.nn.EmbeddingBag``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchrec_tt.modules.optim_types import OptimType, to_fused_optimizer
from torchrec_tt.modules.tt_cache import EvictionPolicy, TTRowCache, TTShape, fit_tt_rows_
from torchrec_tt.modules.tt_init import WEIGHT_DISTS, init_tt_cores
from torchrec_tt.modules.tt_shapes import (
    canonical_to_internal,
    internal_to_canonical,
    resolve_tt_shapes,
    tt_num_parameters,
)
from torchrec_tt.modules.tt_svd import tt_svd
from torchrec_tt.ops import (
    FusedOptimizer,
    PoolingMode,
    tt_embedding_bag,
    tt_embedding_bag_backward_fused_,
    tt_embedding_bag_for_backward,
    tt_lookup_rows,
)
from torchrec_tt.ops.tt_embedding_bag import per_sample_weights_grad

logger = logging.getLogger(__name__)

__all__ = ["TTEmbeddingBag"]

_MODES = {"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN, "max": PoolingMode.SUM}  # max: see _max_pool


def _bag_of_lookups(offsets: Tensor, num_indices: int) -> Tensor:
    """The bag of every lookup from ``B + 1`` int64 offsets, by binary search.

    No host sync; malformed offsets still give bags in ``[0, B)``, for the ops or the caller
    to report.
    """
    positions = torch.arange(num_indices, device=offsets.device)
    return torch.searchsorted(offsets[1:], positions, right=True).clamp_max(max(offsets.numel() - 2, 0))


def _max_pool(rows: Tensor, bag: Tensor, num_bags: int) -> Tensor:
    """Per bag the element-wise max of its rows (0 for an empty bag); bag == num_bags: left out."""
    index = bag[:, None].expand(-1, rows.shape[1])
    out = rows.new_zeros(num_bags + 1, rows.shape[1]).scatter_reduce(0, index, rows, "amax", include_self=False)
    return out[:num_bags]


def _max_pool_row_grads(grad_out: Tensor, rows: Tensor, out: Tensor, bag: Tensor) -> Tensor:
    """Gradient of every looked-up row under ``_max_pool``.

    The bag's gradient where the row holds the bag's max, shared evenly between rows that tie
    (``scatter_reduce``'s rule); 0 for left-out rows.
    """
    pad = grad_out.new_zeros(1, grad_out.shape[1])
    g, o = torch.cat([grad_out, pad]), torch.cat([out, pad.to(out.dtype)])
    selected = rows == o[bag]
    ties = torch.zeros_like(o).index_add_(0, bag, selected.to(o.dtype))
    return g[bag] * selected / ties[bag].clamp_min(1)


class _FusedTTEmbeddingBag(torch.autograd.Function):
    """Forward lookup whose backward applies the module's fused optimizer in place."""

    @staticmethod
    def forward(ctx: Any, table: TTEmbeddingBag, indices: Tensor, offsets: Tensor, weights: Tensor | None, *cores: Tensor) -> Tensor:
        ctx.table = table
        ctx.versions = None if torch.compiler.is_compiling() else [c._version for c in cores]
        ctx.cores = cores
        ctx.save_for_backward(indices, offsets, weights)
        return tt_embedding_bag_for_backward(cores, indices, offsets, weights, *table._op_shape_args(), table._pooling_mode)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        indices, offsets, weights = ctx.saved_tensors
        table: TTEmbeddingBag = ctx.table
        if ctx.versions is not None and [c._version for c in ctx.cores] != ctx.versions:
            raise RuntimeError(
                f"TTEmbeddingBag '{table.name}' (sparse=True): the TT cores changed between this forward and its "
                "backward (e.g. a second backward through another lookup of the same table already applied its "
                "update). Run one backward per lookup, or concatenate the lookups into one call."
            )
        grad_output = grad_output.contiguous()
        weight_grad = None
        if weights is not None and ctx.needs_input_grad[3]:
            weight_grad = per_sample_weights_grad(
                grad_output, list(ctx.cores), indices, offsets, *table._op_shape_args(), table._pooling_mode
            ).to(weights.dtype)
        table._apply_fused_update(grad_output, indices, offsets, weights)
        return (None, None, None, weight_grad, *([None] * len(ctx.cores)))


class _FusedMaxTTEmbeddingBag(torch.autograd.Function):
    """Max-pooled lookup whose backward applies the module's fused optimizer to the selected rows."""

    @staticmethod
    def forward(ctx: Any, table: TTEmbeddingBag, indices: Tensor, bag: Tensor, num_bags: int, *cores: Tensor) -> Tensor:
        rows = tt_lookup_rows(list(cores), indices, *table._op_shape_args())
        out = _max_pool(rows, bag, num_bags)
        ctx.table, ctx.cores = table, cores
        ctx.versions = None if torch.compiler.is_compiling() else [c._version for c in cores]
        ctx.save_for_backward(indices, bag, rows, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        indices, bag, rows, out = ctx.saved_tensors
        table: TTEmbeddingBag = ctx.table
        if ctx.versions is not None and [c._version for c in ctx.cores] != ctx.versions:
            raise RuntimeError(
                f"TTEmbeddingBag '{table.name}' (sparse=True): the TT cores changed between this forward and its "
                "backward. Run one backward per lookup, or concatenate the lookups into one call."
            )
        row_grads = _max_pool_row_grads(grad_output, rows, out, bag)
        one_per_bag = torch.arange(indices.numel() + 1, device=indices.device, dtype=indices.dtype)
        table._apply_fused_update(row_grads.contiguous(), indices, one_per_bag, None, int(PoolingMode.SUM))
        return (None, None, None, None, *([None] * len(ctx.cores)))


class _CachedFusedTTEmbeddingBag(torch.autograd.Function):
    """Cached lookup (hits from the cache, misses from the cores) whose backward trains both in place."""

    @staticmethod
    def forward(ctx: Any, table: TTEmbeddingBag, indices: Tensor, offsets: Tensor, weights: Tensor | None, *cores: Tensor) -> Tensor:
        out = table._cached_lookup(indices, offsets, weights, list(cores), for_backward=True)
        ctx.table, ctx.cores = table, cores
        ctx.save_for_backward(indices, offsets, weights)
        ctx.versions = [c._version for c in cores] + [table.cache.cache_weight._version, table.cache.cache_ids._version]
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        table: TTEmbeddingBag = ctx.table
        cache = table.cache
        indices, offsets, weights = ctx.saved_tensors
        if [c._version for c in ctx.cores] + [cache.cache_weight._version, cache.cache_ids._version] != ctx.versions:
            raise RuntimeError(
                f"TTEmbeddingBag '{table.name}' (sparse=True, use_cache=True): the cores or the cache changed between "
                "this forward and its backward (a second backward, or a cache_populate() in between). Run one "
                "backward per lookup and populate between steps."
            )
        grad_output = grad_output.contiguous()
        cores = list(ctx.cores)
        weight_grad = None
        if ctx.needs_input_grad[3]:
            weight_grad = cache.weights_grad(grad_output, cores, table._tt_shape(), indices, offsets, table._pooling_mode)
            weight_grad = weight_grad.to(weights.dtype)
        cache.fused_backward_(
            grad_output, cores, table.optimizer_states(), table._tt_shape(), indices, offsets, weights,
            table._pooling_mode, table.learning_rate, table.eps,
        )
        return (None, None, None, weight_grad, *([None] * len(ctx.cores)))


class TTEmbeddingBag(nn.Module):
    """Embedding bag whose table is stored as Tensor-Train cores.

    A drop-in for ``torch.nn.EmbeddingBag`` (same forward conventions) and for
    FBTT-Embedding's ``TTEmbeddingBag`` (same parameter names and meaning). The
    ``num_embeddings x embedding_dim`` table ``W`` is never stored: row ``i``,
    with digits ``(i_1..i_d)`` in radix ``tt_p_shapes`` (``i_1`` most
    significant), is the chain product ``G_1[i_1] G_2[i_2] ... G_d[i_d]`` of core
    slices ``G_k[i_k]`` of shape ``(r_{k-1}, q_k, r_k)``.

    Args:
        num_embeddings (int): rows of the table.
        embedding_dim (int): columns of the table.
        tt_p_shapes (list[int], optional): row factorisation, ``prod >= num_embeddings``;
            chosen automatically when None (see ``num_padded_rows``).
        tt_q_shapes (list[int], optional): column factorisation, ``prod == embedding_dim``;
            chosen automatically when None.
        tt_ranks (int or list[int]): the ``d - 1`` inner TT ranks (required).
        sparse (bool): if True the optimizer update is fused into backward (exact,
            duplicates coalesced) and no gradient is returned; if False the cores get
            ordinary ``.grad`` for any ``torch.optim`` optimizer.
        optimizer (OptimType): fused optimizer (``sparse=True`` only): ``SGD``/``EXACT_SGD``,
            ``EXACT_ADAGRAD``, ``EXACT_ROWWISE_ADAGRAD``/``ROWWISE_ADAGRAD``.
        learning_rate (float): fused optimizer's learning rate.
        eps (float): Adagrad's denominator term.
        use_cache (bool): keep the most frequently looked-up rows in an LFU software
            cache (:class:`~torchrec_tt.modules.tt_cache.TTRowCache`), served and trained
            without TT computation; needs ``sparse=True``. Rows are counted during
            training forwards; :meth:`cache_populate` (or ``cache_populate_interval``)
            refreshes the cache.
        cache_size (int): rows in the cache (``use_cache=True``).
        hashtbl_size (int): slots of the access-frequency hash table (``0``: ``4 * cache_size``).
        weight_dist (str): ``"uniform"``, ``"normal"``, ``"approx-uniform"`` or
            ``"approx-normal"`` (see :mod:`torchrec_tt.modules.tt_init`).
        mode (str): ``"sum"``, ``"mean"`` or ``"max"`` pooling (``"max"``: the element-wise
            max of the bag's rows, as in ``nn.EmbeddingBag``; its gradient goes to the rows
            holding the max, shared evenly between rows that tie; no per-sample weights, no
            cache).
        include_last_offset (bool): as in ``nn.EmbeddingBag``.
        padding_idx (int, optional): as in ``nn.EmbeddingBag``: lookups of this row are left out
            of their bag's sum or mean (and of its count) and get no gradient. Its TT row is not
            zero (``full_weight()`` shows it), but no bag ever adds it. Internally the ops pool
            with per-lookup weights: 0 for the padding, the mean's ``1 / count`` otherwise.
        name (str): table name used in error messages.
        device (torch.device, optional): where the cores live (``"meta"`` allowed).
        dtype (torch.dtype, optional): dtype of the cores (default float32).
        cache_eviction_policy (str): ``"writeback"`` (evicted trained rows are fitted
            back into the cores) or ``"discard"`` (the TT-Rec paper's behaviour).
        cache_populate_interval (int): repopulate the cache every this many training
            forwards (``0``: only when :meth:`cache_populate` is called).
        cache_max_probes (int): hash-table slots an id probes before it goes uncounted.
        cache_count_decay (float): in ``[0, 1]``: the cache's access counts are multiplied by
            it after every populate (``1``: pure LFU; see :class:`TTRowCache`).

    Example::

        >>> emb = TTEmbeddingBag(1000, 16, tt_ranks=[8, 8], mode="mean")
        >>> emb.tt_p_shapes, emb.tt_q_shapes, emb.tt_ranks
        ([10, 10, 10], [4, 2, 2], [1, 8, 8, 1])
        >>> ids = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
        >>> emb(ids, torch.tensor([0, 4])).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tt_p_shapes: Sequence[int] | None = None,
        tt_q_shapes: Sequence[int] | None = None,
        tt_ranks: int | Sequence[int] | None = None,
        sparse: bool = False,
        optimizer: OptimType | str = OptimType.SGD,
        learning_rate: float = 0.1,
        eps: float = 1.0e-10,
        use_cache: bool = False,
        cache_size: int = 0,
        hashtbl_size: int = 0,
        weight_dist: str = "approx-normal",
        *,
        mode: str = "sum",
        include_last_offset: bool = False,
        padding_idx: int | None = None,
        name: str = "TTEmbeddingBag",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cache_eviction_policy: EvictionPolicy | str = EvictionPolicy.WRITEBACK,
        cache_populate_interval: int = 0,
        cache_max_probes: int = 8,
        cache_count_decay: float = 1.0,
    ) -> None:
        super().__init__()
        if use_cache and not sparse:
            raise ValueError(
                f"TTEmbeddingBag '{name}': use_cache=True needs sparse=True (cached rows are trained by the fused "
                "optimizer; torch.optim optimizers would keep per-slot state across evictions)"
            )
        if mode not in _MODES:
            raise ValueError(f"TTEmbeddingBag '{name}': mode must be 'sum', 'mean' or 'max', got {mode!r}")
        if mode == "max" and use_cache:
            raise NotImplementedError(f"TTEmbeddingBag '{name}': mode='max' does not support use_cache=True")
        if weight_dist not in WEIGHT_DISTS:
            raise ValueError(f"TTEmbeddingBag '{name}': weight_dist must be one of {WEIGHT_DISTS}, got {weight_dist!r}")
        try:
            p, q, ranks = resolve_tt_shapes(num_embeddings, embedding_dim, tt_p_shapes, tt_q_shapes, tt_ranks)
            fused = to_fused_optimizer(optimizer) if sparse else None
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"TTEmbeddingBag '{name}': {e}") from None
        self.name = name
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tt_p_shapes: list[int] = p
        self.tt_q_shapes: list[int] = q
        self.tt_ranks: list[int] = ranks
        self.num_tt_core = len(p)
        self._shape = TTShape(p, q, ranks, num_embeddings)  # the ops' shape arguments (fixed for the module's life)
        self.sparse = sparse
        self.optimizer = OptimType(getattr(optimizer, "value", optimizer))
        self._fused_optimizer = fused
        self.learning_rate = float(learning_rate)
        self.eps = float(eps)
        self.use_cache, self.cache_size = use_cache, cache_size
        self.weight_dist = weight_dist
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"TTEmbeddingBag '{name}': padding_idx must be in [-{num_embeddings}, {num_embeddings}), "
                    f"got {padding_idx}"
                )
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self.mode = mode
        # the ops' pooling: with a padding row, a weighted sum (weights from _mask_padding);
        # max mode pools in Python (_max_pool) and trains through sum-pooled bags of one row
        self._pooling_mode = int(_MODES[mode] if padding_idx is None else PoolingMode.SUM)
        self.include_last_offset = include_last_offset
        factory = {"device": device, "dtype": dtype or torch.float32}
        self.tt_cores = nn.ParameterList(
            nn.Parameter(torch.empty(p[k], ranks[k] * q[k] * ranks[k + 1], **factory)) for k in range(len(p))
        )
        for k, shape in enumerate(self._optimizer_state_shapes()):
            state_dtype = torch.promote_types(factory["dtype"], torch.float32)
            self.register_buffer(f"optimizer_state_{k}", torch.zeros(shape, device=device, dtype=state_dtype))
        self.cache: TTRowCache | None = None
        if use_cache:
            self.cache = TTRowCache(
                cache_size, embedding_dim, hashtbl_size, fused, cache_eviction_policy, cache_max_probes,
                cache_populate_interval, count_decay=cache_count_decay, name=name, device=device,
                dtype=factory["dtype"],
            )
        self.hashtbl_size = self.cache.hashtbl_size if self.cache is not None else hashtbl_size
        self.reset_parameters()

    # ------------------------------------------------------------------ properties
    @property
    def num_padded_rows(self) -> int:
        """Rows of the TT grid beyond ``num_embeddings`` (never looked up)."""
        return math.prod(self.tt_p_shapes) - self.num_embeddings

    @property
    def compression_ratio(self) -> float:
        """Scalars of the uncompressed table over scalars in the cores."""
        return self.num_embeddings * self.embedding_dim / tt_num_parameters(self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks)

    def optimizer_states(self) -> list[Tensor]:
        """The fused optimizer's state tensors (empty for SGD or ``sparse=False``)."""
        return [getattr(self, f"optimizer_state_{k}") for k in range(len(self._optimizer_state_shapes()))]

    def _optimizer_state_shapes(self) -> list[tuple[int, ...]]:
        if self._fused_optimizer == FusedOptimizer.ADAGRAD:
            return [(self.tt_p_shapes[k], self.tt_ranks[k] * self.tt_q_shapes[k] * self.tt_ranks[k + 1]) for k in range(self.num_tt_core)]
        if self._fused_optimizer == FusedOptimizer.ROWWISE_ADAGRAD:
            return [(p,) for p in self.tt_p_shapes]
        return []

    def _core_list(self) -> list[Tensor]:
        # The cores in order; ParameterList's own iteration costs ~10 us per core per call
        # (string-indexed __getitem__), and the step makes two calls.
        return list(self.tt_cores._parameters.values())

    def _op_shape_args(self) -> tuple[list[int], list[int], list[int], int]:
        return self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks, self.num_embeddings

    # ------------------------------------------------------------------ init / state
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the cores per ``weight_dist`` and zero the optimizer state.

        Args:
            generator (torch.Generator, optional): random source.
        """
        init_tt_cores(list(self.tt_cores), self.weight_dist, self.num_embeddings, self.tt_ranks, generator)
        with torch.no_grad():
            for state in self.optimizer_states():
                state.zero_()
        if self.cache is not None:
            with torch.no_grad():
                for name, fresh in self.cache.empty_state().items():
                    getattr(self.cache, name).copy_(fresh)

    def set_learning_rate(self, learning_rate: float) -> None:
        """Set the fused optimizer's learning rate (used by the next backward)."""
        self.learning_rate = float(learning_rate)

    def canonical_cores(self) -> list[Tensor]:
        """The cores in the canonical layout ``[r_{k-1}, p_k, q_k, r_k]`` (views).

        Example::

            >>> emb = TTEmbeddingBag(100, 8, [5, 20], [2, 4], [3])
            >>> [tuple(c.shape) for c in emb.canonical_cores()]
            [(1, 5, 2, 3), (3, 20, 4, 1)]
        """
        r, q = self.tt_ranks, self.tt_q_shapes
        return [internal_to_canonical(c, r[k], q[k], r[k + 1]) for k, c in enumerate(self.tt_cores)]

    @torch.no_grad()
    def load_canonical_cores(self, cores: Sequence[Tensor]) -> None:
        """Copy cores given in the canonical layout into this table (all or nothing).

        Raises:
            ValueError: naming the first core whose shape does not match.
        """
        expected = [tuple(c.shape) for c in self.canonical_cores()]
        if len(cores) != len(expected) or any(tuple(c.shape) != e for c, e in zip(cores, expected, strict=False)):
            raise ValueError(
                f"TTEmbeddingBag '{self.name}': canonical cores of shapes {[tuple(c.shape) for c in cores]} do not "
                f"match this table's {expected}"
            )
        for dst, src in zip(self.tt_cores, cores, strict=True):
            dst.copy_(canonical_to_internal(src))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Validate every TT tensor before anything of this table is copied.
        own = {f"tt_cores.{k}": c for k, c in enumerate(self.tt_cores)}
        own.update({f"optimizer_state_{k}": s for k, s in enumerate(self.optimizer_states())})
        for key, mine in own.items():
            theirs = state_dict.get(prefix + key)
            if theirs is not None and tuple(theirs.shape) != tuple(mine.shape):
                raise RuntimeError(
                    f"TTEmbeddingBag '{self.name}': checkpoint tensor {prefix + key} has shape {tuple(theirs.shape)}, "
                    f"this table has {tuple(mine.shape)} (p={self.tt_p_shapes}, q={self.tt_q_shapes}, "
                    f"ranks={self.tt_ranks}, optimizer={self.optimizer.name}); nothing was loaded"
                )
        cache_keys = sorted(k for k in state_dict if k.startswith(prefix + "cache."))
        if self.cache is None and cache_keys:
            raise RuntimeError(
                f"TTEmbeddingBag '{self.name}': the checkpoint holds an LFU cache ({cache_keys[0]}, ...) but this table "
                "has use_cache=False; loading it would lose the cached rows' training. Call cache_flush() on the "
                "saved table before saving, or build this table with use_cache=True; nothing was loaded"
            )
        if self.cache is not None:
            mine = dict(self.cache.named_buffers(prefix=prefix + "cache"))
            if not cache_keys:
                # A checkpoint without a cache: the cores hold the whole model; start with an empty cache.
                state_dict.update({f"{prefix}cache.{k}": v for k, v in self.cache.empty_state().items()})
            for key, mine_t in mine.items():
                theirs = state_dict.get(key)
                if theirs is not None and tuple(theirs.shape) != tuple(mine_t.shape):
                    raise RuntimeError(
                        f"TTEmbeddingBag '{self.name}': checkpoint tensor {key} has shape {tuple(theirs.shape)}, this "
                        f"table's cache has {tuple(mine_t.shape)} (cache_size={self.cache.cache_size}, "
                        f"hashtbl_size={self.cache.hashtbl_size}, optimizer={self.optimizer.name}); nothing was loaded"
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ dense conversion
    def full_weight(self) -> Tensor:
        """Materialise the ``num_embeddings x embedding_dim`` table (differentiable w.r.t. the cores).

        With a cache, cached rows hold their cached values.

        Example::

            >>> TTEmbeddingBag(10, 3, None, None, tt_ranks=[2, 2]).full_weight().shape
            torch.Size([10, 3])
        """
        ids = torch.arange(self.num_embeddings, device=self.tt_cores[0].device)
        rows = tt_lookup_rows(list(self.tt_cores), ids, *self._op_shape_args())
        return self.cache.overlay(ids, rows) if self.cache is not None else rows

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        tt_ranks: int | Sequence[int],
        tt_p_shapes: Sequence[int] | None = None,
        tt_q_shapes: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> TTEmbeddingBag:
        """Compress a trained ``(num_embeddings, embedding_dim)`` table by TT-SVD.

        The cores are the truncated TT-SVD of the table (rows padded with zeros to
        ``prod(p)``); the relative Frobenius error ``||W - W_tt|| / ||W||`` is logged
        and kept in ``tt_svd_relative_error``.

        Args:
            weight (Tensor): the dense table.
            tt_ranks (int or list[int]): maximal inner ranks (lower ranks are padded with zeros).
            tt_p_shapes (list[int], optional): row factorisation.
            tt_q_shapes (list[int], optional): column factorisation.
            **kwargs: other ``TTEmbeddingBag`` arguments (``sparse``, ``optimizer``, ``mode``...).

        Example::

            >>> w = torch.randn(100, 8)
            >>> emb = TTEmbeddingBag.from_dense(w, tt_ranks=[64], tt_p_shapes=[10, 10], tt_q_shapes=[2, 4])
            >>> emb.tt_svd_relative_error < 1e-5
            True
        """
        if weight.dim() != 2:
            raise ValueError(f"from_dense: weight must be 2-D (num_embeddings, embedding_dim), got {tuple(weight.shape)}")
        kwargs.setdefault("dtype", weight.dtype if weight.is_floating_point() else None)
        kwargs.setdefault("device", weight.device)
        module = cls(weight.shape[0], weight.shape[1], tt_p_shapes, tt_q_shapes, tt_ranks, **kwargs)
        cores = tt_svd(weight, module.tt_p_shapes, module.tt_q_shapes, module.tt_ranks)
        module.load_canonical_cores(cores)
        with torch.no_grad():
            approx = module.full_weight().double()
            ref = weight.double()
            error = float((approx - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))
        module.tt_svd_relative_error = error
        logger.info(
            "from_dense %s: TT-SVD with p=%s q=%s ranks=%s, relative Frobenius error %.3e, compression %.1fx",
            module.name, module.tt_p_shapes, module.tt_q_shapes, module.tt_ranks, error, module.compression_ratio,
        )
        return module

    # ------------------------------------------------------------------ forward
    def _bags(self, input: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Normalise ``nn.EmbeddingBag`` inputs to (ids, B + 1 offsets, weights)."""
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError(f"TTEmbeddingBag '{self.name}': offsets must be None when input is 2-D (B, L)")
            num_bags, bag_size = input.shape
            offsets = torch.arange(0, num_bags * bag_size + 1, max(bag_size, 1), device=input.device, dtype=input.dtype)
            if bag_size == 0:
                offsets = torch.zeros(num_bags + 1, device=input.device, dtype=input.dtype)
            input = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None or offsets.dim() != 1:
                raise ValueError(f"TTEmbeddingBag '{self.name}': a 1-D input needs 1-D offsets")
            if not self.include_last_offset:
                offsets = torch.cat([offsets, offsets.new_full((1,), input.shape[0])])
        else:
            raise ValueError(f"TTEmbeddingBag '{self.name}': input must be 1-D or 2-D, got shape {tuple(input.shape)}")
        if self.mode == "max":
            if per_sample_weights is not None:
                raise ValueError(f"TTEmbeddingBag '{self.name}': per_sample_weights are not supported with mode='max'")
        elif self.padding_idx is not None:
            per_sample_weights = self._mask_padding(input, offsets, per_sample_weights)
        return input, offsets, per_sample_weights

    def _max_bags(self, indices: Tensor, offsets: Tensor) -> Tensor:
        """The bag of every lookup (``B`` for ``padding_idx`` lookups), offsets checked.

        A check fails with a ValueError on CPU and a device-side assert on CUDA (no host sync),
        as the ops' own checks do.
        """
        nnz = indices.numel()
        if indices.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError("offsets must have B + 1 >= 1 entries")
        offsets = offsets.long()
        ok = (offsets[0] == 0) & (offsets[-1] == nnz) & (offsets.diff() >= 0).all()
        message = f"offsets must start at 0, be non-decreasing and end at the number of ids ({nnz})"
        if offsets.is_cuda:
            torch._assert_async(ok, f"TTEmbeddingBag '{self.name}': {message}")
        elif not bool(ok):
            raise ValueError(message)  # forward() names the table
        bag = _bag_of_lookups(offsets, nnz)
        if self.padding_idx is not None:
            bag = torch.where(indices == self.padding_idx, offsets.numel() - 1, bag)
        return bag

    def _max_forward(self, indices: Tensor, offsets: Tensor, cores: list[Tensor]) -> Tensor:
        bag = self._max_bags(indices, offsets)
        num_bags = offsets.numel() - 1
        if self.sparse and torch.is_grad_enabled():
            return _FusedMaxTTEmbeddingBag.apply(self, indices, bag, num_bags, *cores)
        return _max_pool(tt_lookup_rows(cores, indices, *self._op_shape_args()), bag, num_bags)

    def _mask_padding(self, indices: Tensor, offsets: Tensor, weights: Tensor | None) -> Tensor:
        """Per-lookup weights that leave out ``padding_idx``.

        0 for its lookups, else the caller's weight (1 without), divided by the bag's count
        of other lookups in mean mode. Device ops only (no host sync); differentiable in
        ``weights``.
        """
        keep = indices != self.padding_idx
        dtype = weights.dtype if weights is not None else self.tt_cores[0].dtype
        w = keep.to(dtype) if weights is None else weights * keep
        if self.mode == "mean" and offsets.numel() > 1:
            # malformed offsets are clamped here and reported by the op, with the table's name
            offsets = offsets.long().clamp(0, indices.numel())
            kept = torch.cat([keep.new_zeros(1, dtype=torch.long), keep.long().cumsum(0)])
            count = (kept[offsets[1:]] - kept[offsets[:-1]]).clamp_min(1)
            w = w / count[_bag_of_lookups(offsets, indices.numel())].to(dtype)
        return w

    def forward(self, input: Tensor, offsets: Tensor | None = None, per_sample_weights: Tensor | None = None) -> Tensor:
        """Pooled lookup, as ``nn.EmbeddingBag.forward``.

        Args:
            input (Tensor): int32/int64 ids, 1-D with ``offsets`` or 2-D ``(B, L)``.
            offsets (Tensor, optional): bag starts (``B`` entries, or ``B + 1`` with
                ``include_last_offset=True``).
            per_sample_weights (Tensor, optional): one weight per id (sum and mean).

        Returns:
            Tensor: ``(B, embedding_dim)``.
        """
        indices, offsets, weights = self._bags(input, offsets, per_sample_weights)
        cores = self._core_list()
        if self.cache is not None:
            return self._cached_forward(indices, offsets, weights, cores)
        try:
            if self.mode == "max":
                return self._max_forward(indices, offsets, cores)
            if self.sparse and torch.is_grad_enabled():
                return _FusedTTEmbeddingBag.apply(self, indices, offsets, weights, *cores)
            return tt_embedding_bag(cores, indices, offsets, weights, *self._op_shape_args(), self._pooling_mode)
        except (IndexError, ValueError) as e:
            raise type(e)(f"TTEmbeddingBag '{self.name}': {e}") from e

    def _apply_fused_update(
        self, grad_output: Tensor, indices: Tensor, offsets: Tensor, weights: Tensor | None, pooling_mode: int | None = None
    ) -> None:
        if torch.is_grad_enabled():  # the in-place update of the leaf cores is not recorded
            with torch.no_grad():
                return self._apply_fused_update(grad_output, indices, offsets, weights, pooling_mode)
        # autograd runs backward with grad mode off: no context manager on the hot path (~2-4 us)
        tt_embedding_bag_backward_fused_(
            grad_output,
            self._core_list(),
            self.optimizer_states(),
            indices,
            offsets,
            weights,
            *self._op_shape_args(),
            self._pooling_mode if pooling_mode is None else pooling_mode,
            int(self._fused_optimizer),
            self.learning_rate,
            self.eps,
        )

    # ------------------------------------------------------------------ cache
    def _cached_forward(self, indices: Tensor, offsets: Tensor, weights: Tensor | None, cores: list[Tensor]) -> Tensor:
        assert self.cache is not None
        if self.training and self.cache.populate_due():
            self.cache_populate()
        if torch.is_grad_enabled():
            out = _CachedFusedTTEmbeddingBag.apply(self, indices, offsets, weights, *cores)
        else:
            out = self._cached_lookup(indices, offsets, weights, cores, for_backward=False)
        return out

    def _tt_shape(self) -> TTShape:
        return self._shape

    def _cached_lookup(
        self, indices: Tensor, offsets: Tensor, weights: Tensor | None, cores: list[Tensor], for_backward: bool
    ) -> Tensor:
        """Hits pooled from the cache plus misses pooled from the cores; counts accesses in training."""
        assert self.cache is not None
        try:
            return self.cache.lookup(
                cores, self._tt_shape(), indices, offsets, weights, self._pooling_mode, self.training, for_backward
            )
        except (IndexError, ValueError) as e:
            raise type(e)(f"TTEmbeddingBag '{self.name}': {e}") from e

    def _writeback(self, ids: Tensor, rows: Tensor) -> None:
        before, after = fit_tt_rows_([c.data for c in self.tt_cores], ids, rows, *self._op_shape_args())
        self.last_writeback = (ids.numel(), before, after)
        logger.info(
            "TTEmbeddingBag '%s': wrote %d evicted cache rows back into the cores, residual %.3e -> %.3e",
            self.name, ids.numel(), before, after,
        )

    def _require_cache(self) -> TTRowCache:
        if self.cache is None:
            raise RuntimeError(f"TTEmbeddingBag '{self.name}': built with use_cache=False")
        return self.cache

    @torch.no_grad()
    def cache_populate(self) -> None:
        """Cache the ``cache_size`` most frequently looked-up rows counted so far.

        Rows that stay cached keep their trained values; new rows are materialised
        from the cores; evicted rows are written back into the cores (policy
        ``"writeback"``) or dropped (``"discard"``).

        Example::

            >>> emb = TTEmbeddingBag(1000, 16, None, None, [8, 8], sparse=True, use_cache=True, cache_size=4)
            >>> _ = emb(torch.tensor([5, 5, 7, 9]), torch.tensor([0, 2]))
            >>> emb.cache_populate()
            >>> emb.cache.cache_ids[:3].tolist()
            [5, 7, 9]
        """
        cache = self._require_cache()
        cores = list(self.tt_cores)
        cache.populate(lambda ids: tt_lookup_rows(cores, ids, *self._op_shape_args()), self._writeback)

    @torch.no_grad()
    def cache_flush(self) -> None:
        """Evict every cached row (written back per the policy); the cache is then empty."""
        self._require_cache().flush(self._writeback)

    def cache_stats(self) -> dict[str, float]:
        """Cache counters (lookups, hits, unique misses, evictions, hash drops, hit rate); one host sync.

        Example::

            >>> emb = TTEmbeddingBag(100, 8, None, None, [4], sparse=True, use_cache=True, cache_size=2)
            >>> emb.cache_stats()["hit_rate"]
            0.0
        """
        return self._require_cache().statistics()

    def extra_repr(self) -> str:
        s = (
            f"{self.num_embeddings}, {self.embedding_dim}, tt_p_shapes={self.tt_p_shapes}, "
            f"tt_q_shapes={self.tt_q_shapes}, tt_ranks={self.tt_ranks}, mode={self.mode!r}"
        )
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.sparse:
            s += f", sparse=True, optimizer={self.optimizer.name}, learning_rate={self.learning_rate}"
        if self.cache is not None:
            s += f", use_cache=True, cache_size={self.cache_size}, hashtbl_size={self.hashtbl_size}"
        return s

