"""Local TT shards, the pooled lookup that replaces torchrec's TBE lookup, and the gradient sync.

Every table shard a rank owns is a :class:`TTLocalShard`: a TT whose first core
is a slice of the global first core (rows for row-wise / table-row-wise, columns
for column-wise) and whose inner cores are copies of the global ones. A plain
(uncompressed) table is the one-core TT ``p=[N], q=[D], ranks=[1, 1]``, so the
same code shards it.

Gradient flow (one backward per forward, as with torchrec's fused TBE):

* the lookup's backward computes each local shard's core gradients (or, for a
  table without replicated cores and a fused optimizer, runs the fused
  backward-and-update op directly);
* gradients of *replicated* cores (inner cores of RW/TWRW/CW tables, every core
  of a data-parallel table) are partial sums over ranks: after all lookups'
  backward, :class:`_TTSyncPoint` all-reduces them (SUM) in one flat buffer laid
  out identically on every rank, so every replica sees the global gradient;
  data-parallel gradients are then divided by the world size when torchrec's
  gradient division is on (the model-parallel output dists already divide), so
  every sharding type trains like the unsharded module on the global batch with
  loss ``mean over ranks of the per-rank losses``;
* then the fused optimizer updates the cores (or, without one, the gradients
  are accumulated into ``.grad``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.modules.tt_cache import TTRowCache, TTShape, fit_tt_rows_
from torchrec_tt.modules.tt_embedding_bag import TTEmbeddingBag
from torchrec_tt.modules.tt_embedding_configs import is_tt_config, tt_config_shapes, uses_cache
from torchrec_tt.modules.tt_embedding_modules import concat_feature_bags
from torchrec_tt.modules.tt_init import init_tt_cores
from torchrec_tt.ops import (
    FusedOptimizer,
    tt_embedding_bag,
    tt_embedding_bag_backward,
    tt_embedding_bag_backward_fused_,
    tt_embedding_bag_for_backward,
    tt_lookup_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["TTFusedOptimizerSettings", "TTLocalShard", "TTPooledLookup", "TTStepSync"]


@dataclass(frozen=True)
class TTFusedOptimizerSettings:
    """Fused optimizer of a sharded TT table (``None`` optimizer: gradients go to ``.grad``)."""

    optimizer: FusedOptimizer | None
    learning_rate: float = 0.01
    eps: float = 1.0e-8


def _get_gradient_division() -> bool:
    from torchrec.distributed import comm_ops

    getter = getattr(comm_ops, "get_gradient_division", None)
    return bool(getter()) if getter is not None else bool(getattr(comm_ops, "GRADIENT_DIVISION", True))


class TTLocalShard(nn.Module):
    """One rank's shard of one table: local TT cores, fused optimizer state, lookup.

    Args:
        config (EmbeddingBagConfig): the table (TT or plain).
        sharding_type (str): torchrec ``ShardingType`` value.
        row_offset (int): first global row of the shard.
        num_rows (int): rows of the shard (ids arrive local, in ``[0, num_rows)``).
        col_offset (int): first global column of the shard.
        num_cols (int): columns of the shard.
        optim (TTFusedOptimizerSettings): fused optimizer.
        device (torch.device): where the cores live.
        source (nn.Module, optional): the unsharded table to copy values from
            (``TTEmbeddingBag`` or ``nn.EmbeddingBag``); ignored when on meta.
        pool_after_dist (bool): pool with SUM here; MEAN is applied after the output
            dist (row-wise shardings).

    Raises:
        ValueError: when the shard is not made of whole first-core slices.
    """

    def __init__(
        self,
        config: EmbeddingBagConfig,
        sharding_type: str,
        row_offset: int,
        num_rows: int,
        col_offset: int,
        num_cols: int,
        optim: TTFusedOptimizerSettings,
        device: torch.device,
        source: nn.Module | None = None,
        pool_after_dist: bool = False,
    ) -> None:
        super().__init__()
        p, q, ranks = tt_config_shapes(config)
        p_inner, q_inner = math.prod(p[1:]), math.prod(q[1:])
        name = config.name
        if row_offset % p_inner != 0 or (num_rows % p_inner != 0 and row_offset + num_rows != config.num_embeddings):
            raise ValueError(
                f"table '{name}' ({sharding_type}): rows [{row_offset}, {row_offset + num_rows}) are not whole "
                f"first-core slices of prod(tt_p_shapes[1:]) = {p_inner} rows; choose tt_p_shapes / num_embeddings "
                "so that ceil(num_embeddings / num_row_shards) is a multiple of it "
                "(torchrec_tt.modules.align_config_for_row_wise does this)"
            )
        if col_offset % q_inner != 0 or num_cols % q_inner != 0:
            raise ValueError(
                f"table '{name}' ({sharding_type}): columns [{col_offset}, {col_offset + num_cols}) are not whole "
                f"first-core slices of prod(tt_q_shapes[1:]) = {q_inner} columns; use column shards that are "
                "multiples of it"
            )
        self.table_name = name
        self.sharding_type = sharding_type
        self.global_p, self.global_q, self.ranks = p, q, ranks
        self.num_embeddings, self.embedding_dim = config.num_embeddings, config.embedding_dim
        self.row_offset, self.num_rows, self.col_offset, self.num_cols = row_offset, num_rows, col_offset, num_cols
        self.slice_start = row_offset // p_inner
        self.slice_stop = math.ceil((row_offset + num_rows) / p_inner) if num_rows > 0 else self.slice_start
        self.col_start, self.col_stop = col_offset // q_inner, (col_offset + num_cols) // q_inner
        self.p = [self.slice_stop - self.slice_start, *p[1:]]
        self.q = [self.col_stop - self.col_start, *q[1:]]
        self._shape = TTShape(self.p, self.q, self.ranks, self.num_rows)  # the ops' shape arguments (fixed)
        self.is_tt = is_tt_config(config)
        self.pooling_mode = int(config.pooling == PoolingType.MEAN and not pool_after_dist)
        d = len(p)
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            self.replicated = list(range(d))
        elif sharding_type == ShardingType.TABLE_WISE.value:
            self.replicated = []
        else:
            self.replicated = list(range(1, d))
        self.optim = optim
        self.exact_rowwise_cw = (
            optim.optimizer == FusedOptimizer.ROWWISE_ADAGRAD
            and self.q[0] != q[0]  # column-sharded first core: row-wise state needs the global row norm
        )
        dtype = torch.float32
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.p[k], ranks[k] * self.q[k] * ranks[k + 1], device=device, dtype=dtype))
            for k in range(d)
        )
        if optim.optimizer is not None:
            for c in self.cores:
                c._in_backward_optimizers = [_empty_fused_optimizer()]  # dense optimizers skip these
        for k in range(d):
            shape: tuple[int, ...] | None = None
            if optim.optimizer == FusedOptimizer.ADAGRAD:
                shape = tuple(self.cores[k].shape)
            elif optim.optimizer == FusedOptimizer.ROWWISE_ADAGRAD:
                shape = (self.p[k],)
            if shape is not None:
                # not persistent: checkpointed through the fused optimizer's state_dict
                self.register_buffer(f"optimizer_state_{k}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.cache: TTRowCache | None = None
        if uses_cache(config) and self.num_rows > 0:
            self.cache = TTRowCache(
                config.cache_size, self.num_cols, config.hashtbl_size, optim.optimizer, config.cache_eviction_policy,
                populate_interval=config.cache_populate_interval, count_decay=config.cache_count_decay,
                name=f"{name} (rows {row_offset}+{num_rows}, columns {col_offset}+{num_cols})", device=device, dtype=dtype,
            )
        self._init_values(config, source)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_values(self, config: EmbeddingBagConfig, source: nn.Module | None) -> None:
        if self.cores[0].device.type == "meta":
            return
        src_cores: list[Tensor] | None = None
        if isinstance(source, TTEmbeddingBag) and source.tt_cores[0].device.type != "meta":
            src_cores = [c.detach() for c in source.tt_cores]
        elif isinstance(source, nn.EmbeddingBag) and source.weight.device.type != "meta":
            src_cores = [source.weight.detach()]
        if src_cores is not None:
            for k, core in enumerate(self.cores):
                core.copy_(self.local_slice(k, src_cores[k]))
            return
        if self.is_tt:
            init_tt_cores(list(self.cores), config.weight_dist, config.num_embeddings, self.ranks)
        elif config.init_fn is not None:
            config.init_fn(self.cores[0])
        else:
            bound = math.sqrt(1.0 / config.num_embeddings)
            self.cores[0].uniform_(-bound, bound)

    def local_slice(self, k: int, global_core: Tensor) -> Tensor:
        """This shard's part of global core ``k`` (internal layout ``[p_k, r_k*q_k*r_{k+1}]``)."""
        if k != 0:
            return global_core
        q1, r1 = self.global_q[0], self.ranks[1]
        view = global_core.view(global_core.shape[0], q1, r1)
        return view[self.slice_start : self.slice_stop, self.col_start : self.col_stop].reshape(self.p[0], -1)

    def optimizer_states(self) -> list[Tensor]:
        return [getattr(self, f"optimizer_state_{k}") for k in range(len(self.cores)) if hasattr(self, f"optimizer_state_{k}")]

    # ------------------------------------------------------------------ compute
    def forward_bags(self, ids: Tensor, offsets: Tensor, weights: Tensor | None, for_backward: bool) -> Tensor:
        """Pooled lookup; ``for_backward``: inside the training Function (see :func:`tt_embedding_bag_for_backward`)."""
        if self.num_rows == 0 or ids.numel() == 0 and offsets.numel() == 1:
            return self.cores[0].new_zeros(offsets.numel() - 1, self.num_cols)
        pool = tt_embedding_bag_for_backward if for_backward else tt_embedding_bag
        return pool(self.core_list(), ids, offsets, weights, self.p, self.q, self.ranks, self.num_rows, self.pooling_mode)

    def tt_shape(self) -> TTShape:
        return self._shape

    def core_list(self) -> list[Tensor]:
        """The cores in order (ParameterList's own iteration costs ~10 us per core per call)."""
        return list(self.cores._parameters.values())

    def forward_cached(self, ids: Tensor, offsets: Tensor, weights: Tensor | None, for_backward: bool) -> Tensor:
        """Lookup through the cache: hits from the cached rows, misses from the cores."""
        assert self.cache is not None
        if self.training and self.cache.populate_due():
            self.cache_populate()
        return self.cache.lookup(
            self.core_list(), self.tt_shape(), ids, offsets, weights, self.pooling_mode, self.training, for_backward
        )

    def core_gradients(self, grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None) -> list[Tensor]:
        if self.num_rows == 0:
            return [torch.zeros_like(c) for c in self.cores]
        return tt_embedding_bag_backward(
            grad, self.core_list(), ids, offsets, weights, self.p, self.q, self.ranks, self.num_rows, self.pooling_mode
        )

    def fused_backward_(self, grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None) -> None:
        if self.num_rows == 0:
            return
        tt_embedding_bag_backward_fused_(
            grad, self.core_list(), self.optimizer_states(), ids, offsets, weights, self.p, self.q, self.ranks,
            self.num_rows, self.pooling_mode, int(self.optim.optimizer),
            self.optim.learning_rate, self.optim.eps,
        )

    # ------------------------------------------------------------------ cache
    def _writeback(self, ids: Tensor, rows: Tensor) -> None:
        """Fit this shard's unreplicated cores to evicted rows (replicated cores must stay equal on all ranks)."""
        own = [k for k in range(len(self.cores)) if k not in self.replicated]
        cores = [c.data for c in self.cores]
        before, after = fit_tt_rows_(cores, ids, rows, self.p, self.q, self.ranks, self.num_rows, core_indices=own)
        logger.info(
            "table '%s' shard (rows %d+%d): wrote %d evicted cache rows back into cores %s, residual %.3e -> %.3e",
            self.table_name, self.row_offset, self.num_rows, ids.numel(), own, before, after,
        )

    @torch.no_grad()
    def cache_populate(self) -> None:
        """Refresh this shard's cache (see :meth:`TTEmbeddingBag.cache_populate`)."""
        if self.cache is None:
            return
        cores = [c.data for c in self.cores]
        self.cache.populate(
            lambda ids: tt_lookup_rows(cores, ids, self.p, self.q, self.ranks, self.num_rows), self._writeback
        )

    @torch.no_grad()
    def cache_flush(self) -> None:
        """Evict every cached row of this shard (written back per the policy)."""
        if self.cache is not None:
            self.cache.flush(self._writeback)

    def versions(self) -> list[int]:
        """Version counters of the tensors a lookup's backward updates."""
        extra = [self.cache.cache_weight._version, self.cache.cache_ids._version] if self.cache is not None else []
        return [c._version for c in self.cores] + extra

    @torch.no_grad()
    def apply_dense_update(self, grads: Sequence[Tensor], row_sumsq0: Tensor | None = None) -> None:
        """Apply the fused optimizer to dense core gradients (only slices with a non-zero gradient move).

        Matches the fused op's exact update: a touched slice with a zero gradient
        is unchanged by SGD / Adagrad / row-wise Adagrad, so restricting to slices
        with a non-zero gradient is the same update.

        Args:
            grads (list[Tensor]): global gradients of the local cores.
            row_sumsq0 (Tensor, optional): for row-wise Adagrad on a column-sharded first
                core, the per-slice sum of squared gradients over all column shards.
        """
        opt = self.optim.optimizer
        lr, eps = self.optim.learning_rate, self.optim.eps
        states = self.optimizer_states()
        for k, (core, g) in enumerate(zip(self.cores, grads, strict=True)):
            touched = torch.nonzero(g.ne(0).any(dim=1)).squeeze(1)
            if touched.numel() == 0:
                continue
            gk = g.index_select(0, touched).float()
            w = core.index_select(0, touched).float()
            if opt == FusedOptimizer.SGD:
                w = w - lr * gk
            elif opt == FusedOptimizer.ADAGRAD:
                s = states[k].index_select(0, touched).float() + gk * gk
                w = w - lr * gk / (s.sqrt() + eps)
                states[k].index_copy_(0, touched, s.to(states[k].dtype))
            elif opt == FusedOptimizer.ROWWISE_ADAGRAD:
                if k == 0 and row_sumsq0 is not None:
                    mean_sq = row_sumsq0.index_select(0, touched).float() / (self.ranks[1] * self.global_q[0])
                else:
                    mean_sq = (gk * gk).mean(dim=1)
                s = states[k].index_select(0, touched).float() + mean_sq
                w = w - lr * gk / (s.sqrt() + eps).unsqueeze(1)
                states[k].index_copy_(0, touched, s.to(states[k].dtype))
            else:  # pragma: no cover - guarded by the sharder
                raise ValueError(f"table '{self.table_name}': unsupported fused optimizer {opt}")
            core.index_copy_(0, touched, w.to(core.dtype))

    @torch.no_grad()
    def accumulate_grad(self, grads: Sequence[Tensor]) -> None:
        for core, g in zip(self.cores, grads, strict=True):
            if core.grad is None:
                core.grad = g.to(core.dtype).clone()
            else:
                core.grad.add_(g.to(core.dtype))


def _empty_fused_optimizer() -> Any:
    from torchrec.optim.fused import EmptyFusedOptimizer

    return EmptyFusedOptimizer()


@dataclass
class _PendingGrads:
    shard: TTLocalShard
    grads: list[Tensor]


@dataclass
class _StepState:
    """Gradients waiting for the replicated-core all-reduce of one backward."""

    pending: list[_PendingGrads] = field(default_factory=list)
    done: bool = False


class TTStepSync:
    """Flat all-reduce of replicated-core gradients, then the optimizer update.

    The layout of the flat buffer is built from the *global* plan, so it is the
    same on every rank; ranks that do not hold a table contribute zeros.

    Args:
        layout (dict): ``(table, key) -> (offset, numel)``; ``key`` is a core index or
            ``"sumsq0"`` (per-slice squared-gradient sums of a column-sharded first core).
        dp_tables (set[str]): data-parallel tables (their gradients are averaged).
        process_group (ProcessGroup, optional): the sharding process group.
        world_size (int): ranks in the group.
        device (torch.device): device of the flat buffer.
    """

    def __init__(
        self,
        layout: dict[tuple[str, Any], tuple[int, int]],
        dp_tables: set[str],
        process_group: dist.ProcessGroup | None,
        world_size: int,
        device: torch.device,
    ) -> None:
        self.layout = layout
        self.total = sum(n for _, n in layout.values())
        self.dp_tables = dp_tables
        self.pg = process_group
        self.world_size = world_size
        self.device = device

    def new_step(self) -> _StepState:
        return _StepState()

    def finish(self, state: _StepState) -> None:
        if state.done:
            return
        state.done = True
        buf = None
        if self.total > 0:
            buf = torch.zeros(self.total, device=self.device, dtype=torch.float32)
            for item in state.pending:
                shard = item.shard
                for k in shard.replicated:
                    off, n = self.layout[(shard.table_name, k)]
                    buf[off : off + n] += item.grads[k].reshape(-1).float()
                if shard.exact_rowwise_cw:
                    off, n = self.layout[(shard.table_name, "sumsq0")]
                    buf[off : off + n] += item.grads[0].float().pow(2).sum(dim=1)
            if self.world_size > 1:
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.pg)
            if self.dp_tables and _get_gradient_division():
                for table in self.dp_tables:
                    for (t, _), (off, n) in self.layout.items():
                        if t == table:
                            buf[off : off + n] /= self.world_size
        for item in state.pending:
            shard, grads = item.shard, list(item.grads)
            sumsq0 = None
            if buf is not None:
                for k in shard.replicated:
                    off, n = self.layout[(shard.table_name, k)]
                    grads[k] = buf[off : off + n].view_as(grads[k]).to(grads[k].dtype)
                if shard.exact_rowwise_cw:
                    off, n = self.layout[(shard.table_name, "sumsq0")]
                    sumsq0 = buf[off : off + n]
            if shard.optim.optimizer is None:
                shard.accumulate_grad(grads)
            else:
                shard.apply_dense_update(grads, sumsq0)
        state.pending.clear()


class _TTSyncPoint(torch.autograd.Function):
    """Identity on an anchor scalar; its backward runs after every lookup's backward."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, sync: TTStepSync, state: _StepState) -> Tensor:
        ctx.sync, ctx.state = sync, state
        return anchor.view_as(anchor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        ctx.sync.finish(ctx.state)
        return None, None, None


class _TTLookupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: Tensor, lookup: TTPooledLookup, state: _StepState, bags: list[Any]) -> Tensor:
        ctx.lookup, ctx.state, ctx.bags = lookup, state, bags
        out = lookup.pool(bags, for_backward=True)
        ctx.versions = [bag[0].versions() for bag in bags]
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        lookup: TTPooledLookup = ctx.lookup
        for (shard, *_), versions in zip(ctx.bags, ctx.versions, strict=True):
            if shard.versions() != versions:
                raise RuntimeError(
                    f"sharded TT table '{shard.table_name}': its cores or cache changed between a forward and its "
                    "backward (two forwards before one backward, or a cache populate in between). Run one backward "
                    "per forward."
                )
        lookup.backward(grad_output, ctx.bags, ctx.state)
        return None, None, None, None


class TTPooledLookup(nn.Module):
    """Pooled lookup over this rank's shards of one sharding group.

    Input: the KJT after the input dist, keys in the grouped configs' feature order;
    output: ``(stride, sum of local dims)`` in the same order (``(stride, 0)`` when
    the rank owns nothing), as torchrec's ``GroupedPooledEmbeddingsLookup``.

    Args:
        grouped_configs (list[GroupedEmbeddingConfig]): this rank's tables of the group.
        configs (dict[str, EmbeddingBagConfig]): the unsharded configs by table name.
        sharding_type (str): the group's sharding type.
        optim (dict[str, TTFusedOptimizerSettings]): fused optimizer per table.
        device (torch.device): where the cores live.
        sources (dict[str, nn.Module]): unsharded tables to copy values from.
        weighted (bool): whether the KJT carries per-id weights.
    """

    def __init__(
        self,
        grouped_configs: list[GroupedEmbeddingConfig],
        configs: dict[str, EmbeddingBagConfig],
        sharding_type: str,
        optim: dict[str, TTFusedOptimizerSettings],
        device: torch.device,
        sources: dict[str, nn.Module],
        weighted: bool,
    ) -> None:
        super().__init__()
        pool_after = sharding_type in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
        self.shards = nn.ModuleList()
        self._features_per_shard: list[int] = []
        self._dims: list[int] = []
        self._weighted = weighted
        for group in grouped_configs:
            for table in group.embedding_tables:
                cfg = configs[table.name]
                md = table.local_metadata
                row_off, rows = (md.shard_offsets[0], md.shard_sizes[0]) if md is not None else (0, cfg.num_embeddings)
                col_off, cols = (md.shard_offsets[1], md.shard_sizes[1]) if md is not None else (0, cfg.embedding_dim)
                self.shards.append(
                    TTLocalShard(cfg, sharding_type, row_off, rows, col_off, cols, optim[cfg.name], device,
                                 sources.get(cfg.name), pool_after)
                )
                self._features_per_shard.append(len(table.feature_names))
                self._dims.extend([cols] * len(table.feature_names))
        self._num_features = sum(self._features_per_shard)

    def local_shards(self) -> list[TTLocalShard]:
        return list(self.shards)

    def _bags(self, features: KeyedJaggedTensor) -> list[Any]:
        batch = features.stride()
        values = features.values()
        lengths = features.lengths().view(self._num_features, batch) if self._num_features else None
        split = features.length_per_key() if self._num_features else []
        vals = torch.split(values, split) if self._num_features else []
        w = features.weights_or_none() if self._weighted else None
        ws = torch.split(w, split) if w is not None else None
        bags, f = [], 0
        for shard, n in zip(self.shards, self._features_per_shard, strict=True):
            ids, offsets, weights = concat_feature_bags(
                list(vals[f : f + n]), [lengths[i] for i in range(f, f + n)], None if ws is None else list(ws[f : f + n])
            )
            bags.append([shard, ids, offsets, weights, n, batch])
            f += n
        return bags

    def pool(self, bags: list[Any], for_backward: bool) -> Tensor:
        """Pooled outputs of every shard; a cached shard's entry gets the bags its backward needs appended.

        ``for_backward``: called by the training Function, whose backward follows.
        """
        outs = []
        for bag in bags:
            shard, ids, offsets, weights, n, batch = bag[:6]
            if shard.cache is not None:
                out = shard.forward_cached(ids, offsets, weights, for_backward)
            else:
                out = shard.forward_bags(ids, offsets, weights, for_backward)
            out = out.float()  # (n * B, cols)
            outs.extend(out.split(batch, dim=0) if n > 1 else [out])
        return torch.cat(outs, dim=1) if outs else None  # type: ignore[return-value]

    def lookup(self, features: KeyedJaggedTensor, anchor: Tensor | None, state: _StepState | None) -> Tensor:
        if self._num_features == 0:
            out = torch.zeros(features.stride(), 0, device=features.device())
            return out + anchor if anchor is not None else out
        bags = self._bags(features)
        if anchor is None or state is None:
            with torch.no_grad():
                return self.pool(bags, for_backward=False)
        return _TTLookupFunction.apply(anchor, self, state, bags)

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        """Inference lookup (no gradients); training goes through the sharded module."""
        return self.lookup(features, None, None)

    @torch.no_grad()
    def backward(self, grad_output: Tensor, bags: list[Any], state: _StepState) -> None:
        col = 0
        for bag in bags:
            shard, ids, offsets, weights, n, _batch = bag[:6]
            width = shard.num_cols
            grads = [grad_output[:, col + i * width : col + (i + 1) * width] for i in range(n)]
            col += n * width
            grad = (torch.cat(grads, dim=0) if n > 1 else grads[0]).contiguous().to(shard.cores[0].dtype)
            local_only = not shard.replicated and not shard.exact_rowwise_cw
            cache = shard.cache
            if cache is not None and local_only:  # one fused step: the hits train the cache, the misses the cores
                cache.fused_backward_(
                    grad, shard.core_list(), shard.optimizer_states(), shard.tt_shape(), ids, offsets, weights,
                    shard.pooling_mode, shard.optim.learning_rate, shard.optim.eps,
                )
                continue
            if cache is not None:  # replicated cores: the cache steps here, the cores see only the misses
                weights = cache.update_hits_(
                    grad, ids, offsets, weights, shard.pooling_mode, shard.optim.learning_rate, shard.optim.eps, grad.dtype
                )
            if shard.optim.optimizer is not None and local_only:
                shard.fused_backward_(grad, ids, offsets, weights)
            elif local_only:
                shard.accumulate_grad(shard.core_gradients(grad, ids, offsets, weights))
            else:
                state.pending.append(_PendingGrads(shard, shard.core_gradients(grad, ids, offsets, weights)))
