"""Sharding ``TTEmbeddingBagCollection`` with ``DistributedModelParallel``.

Pass :class:`TTEmbeddingBagCollectionSharder` beside torchrec's default sharders::

    sharders = [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD,
                                                              "learning_rate": 0.05}),
                *get_default_sharders()]
    model = DistributedModelParallel(model, sharders=sharders, plan=plan)

Sharding types (every table, TT or plain, of the collection):

* ``table_wise``: the whole TT on one rank.
* ``row_wise`` / ``table_row_wise``: rank ``r`` owns rows ``[r*B, (r+1)*B)``, ``B = ceil(N / shards)``
  (torchrec's bucketization), which must be whole slices of the first core; the inner
  cores are replicated and their gradients all-reduced (SUM) before the update.
* ``column_wise``: a slice of the first core along ``q_1`` per shard (shard widths must be
  multiples of ``prod(q_2..q_d)``); inner cores replicated as for row-wise.
* ``data_parallel``: a full replica per rank; gradients averaged over ranks.

Input dist, pooled all-to-all / reduce-scatter output dist and quantized comms are
torchrec's own sharding classes; only ``create_lookup()`` is replaced. The compute
kernel in the plan is ``EmbeddingComputeKernel.CUSTOMIZED_KERNEL`` (``dense``/``fused`` are
accepted too and mean the same: the TT lookup).

Gradient convention: torchrec's output dists divide gradients by the world size
(``comm_ops`` gradient division), and data-parallel tables are averaged likewise,
so a step of the sharded model with per-rank loss ``L_r`` equals a step of the
unsharded collection on the global batch with loss ``mean_r L_r``.

Checkpoint layout (``state_dict()`` and ``fused_optimizer.state_dict()``): TT table
``t`` exposes ``embedding_bags.t.canonical_cores.k`` in the canonical global layout
``[r_{k-1}, p_k, q_k, r_k]`` (a sharded first core is a ``ShardedTensor``; replicated or
table-wise cores are plain tensors, which DCP writes once); a plain table exposes
``embedding_bags.t.weight`` (``[N, D]``, as torchrec's EBC). Optimizer state is keyed
``t.cores.k.momentum1`` (Adagrad: the core's shape; row-wise Adagrad: ``[p_k]``).
Any plan / world size can load a checkpoint written under any other.

With ``ShardingEnv(..., output_dtensor=True)`` (as for torchrec's own sharded EBC) the
sharded first cores and their optimizer state are ``DTensor`` instead of ``ShardedTensor``:
like torchrec, on ``env.device_mesh`` with a nominal ``Shard(dim)`` placement and the real
(possibly uneven) local pieces and their global offsets in a ``LocalShardsWrapper``, which
is what DCP reads and writes. Replicated and table-wise cores stay plain tensors in both
modes. Checkpoints do not record the container type: a checkpoint written with DTensor
output loads into a ShardedTensor-output model and vice versa.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torchrec.distributed.embedding_sharding import (
    EmbeddingSharding,
    EmbeddingShardingContext,
    EmbeddingShardingInfo,
    KJTListSplitsAwaitable,
)
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    EmbeddingComputeKernel,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionAwaitable, EmbeddingBagCollectionContext
from torchrec.distributed.sharding.cw_sharding import CwPooledEmbeddingSharding
from torchrec.distributed.sharding.dp_sharding import DpPooledEmbeddingSharding
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.sharding.twrw_sharding import TwRwPooledEmbeddingSharding
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingTableConfig, PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer, FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt.distributed.tt_lookup import (
    TTFusedOptimizerSettings,
    TTLocalShard,
    TTPooledLookup,
    TTStepSync,
    _TTSyncPoint,
)
from torchrec_tt.modules.optim_types import to_fused_optimizer
from torchrec_tt.modules.tt_cache import TTRowCache
from torchrec_tt.modules.tt_embedding_configs import is_tt_config, tt_config_shapes, uses_cache
from torchrec_tt.modules.tt_embedding_modules import TTEmbeddingBagCollection
from torchrec_tt.modules.tt_shapes import internal_to_canonical
from torchrec_tt.ops import FusedOptimizer as FusedOptimizerKind

logger = logging.getLogger(__name__)

__all__ = [
    "TT_COMPUTE_KERNEL",
    "ShardedTTEmbeddingBagCollection",
    "TTEmbeddingBagCollectionSharder",
    "TTFusedOptimizer",
    "resolve_table_optimizer",
]

TT_COMPUTE_KERNEL: str = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
"""The compute kernel of TT tables in sharding plans (``"customized_kernel"``)."""

_ROW_SHARDED = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
_SUPPORTED_SHARDING_TYPES = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
)
_ZERO_KWARGS = ("momentum", "weight_decay", "lr_decay", "initial_accumulator_value", "dampening")


# ---------------------------------------------------------------------- optimizer resolution
def resolve_table_optimizer(
    table: str, fused_params: dict[str, Any] | None, params: list[nn.Parameter]
) -> TTFusedOptimizerSettings:
    """The fused optimizer of one table, from ``apply_optimizer_in_backward`` tags or ``fused_params``.

    Args:
        table (str): table name (for error messages).
        fused_params (dict, optional): ``{"optimizer": EmbOptimType | OptimType | str,
            "learning_rate": float, "eps": float}``.
        params (list[nn.Parameter]): the unsharded table's parameters (their
            ``_optimizer_classes`` / ``_optimizer_kwargs`` tags win over ``fused_params``).

    Returns:
        TTFusedOptimizerSettings: ``optimizer=None`` when none is configured.

    Raises:
        ValueError: unknown optimizer or unsupported optimizer argument, naming the table.
        NotImplementedError: a known optimizer the TT update does not implement.

    Example::

        >>> resolve_table_optimizer("t0", {"optimizer": "exact_sgd", "learning_rate": 0.1}, []).learning_rate
        0.1
    """
    classes = getattr(params[0], "_optimizer_classes", None) if params else None
    try:
        if classes:
            from torchrec.distributed.utils import optimizer_type_to_emb_opt_type

            if len(classes) != 1:
                raise ValueError(f"exactly one in-backward optimizer is supported, got {classes}")
            kwargs = dict(params[0]._optimizer_kwargs[0])
            bad = {k: v for k, v in kwargs.items() if k not in ("lr", "eps") and not (k in _ZERO_KWARGS and not v)}
            bad = {k: v for k, v in bad.items() if k not in ("foreach", "maximize", "differentiable", "fused") or v}
            if bad:
                raise ValueError(f"optimizer arguments {bad} are not supported by the fused TT update (lr, eps only)")
            emb_opt = optimizer_type_to_emb_opt_type(classes[0])
            kind = to_fused_optimizer(emb_opt)
            default_eps = 1e-10 if classes[0] is torch.optim.Adagrad else 1e-8
            return TTFusedOptimizerSettings(kind, float(kwargs.get("lr", 0.01)), float(kwargs.get("eps", default_eps)))
        if fused_params and fused_params.get("optimizer") is not None:
            unknown = set(fused_params) - {"optimizer", "learning_rate", "eps"}
            if unknown:
                logger.debug("table %s: ignoring fused_params %s (not used by TT tables)", table, sorted(unknown))
            kind = to_fused_optimizer(fused_params["optimizer"])
            return TTFusedOptimizerSettings(
                kind, float(fused_params.get("learning_rate", 0.01)), float(fused_params.get("eps", 1e-8))
            )
    except (ValueError, NotImplementedError) as e:
        raise type(e)(f"TT table '{table}': {e}") from None
    return TTFusedOptimizerSettings(None)


# ---------------------------------------------------------------------- shardings
class _TTLookupMixin:
    """Replaces ``create_lookup()`` of a torchrec pooled sharding class by the TT lookup."""

    _tt_args: dict[str, Any]

    def create_lookup(self, device: torch.device | None = None, fused_params: Any = None, feature_processor: Any = None) -> TTPooledLookup:
        if feature_processor is not None:
            raise NotImplementedError("TT tables do not support feature processors")
        grouped = self._grouped_embedding_configs_per_rank[self._rank]  # type: ignore[attr-defined]
        return TTPooledLookup(grouped, device=device if device is not None else self._device, **self._tt_args)  # type: ignore[attr-defined]


def _tt_sharding_class(base: type) -> type:
    return type(f"TT{base.__name__}", (_TTLookupMixin, base), {})


_SHARDING_CLASSES: dict[str, type] = {
    ShardingType.TABLE_WISE.value: _tt_sharding_class(TwPooledEmbeddingSharding),
    ShardingType.ROW_WISE.value: _tt_sharding_class(RwPooledEmbeddingSharding),
    ShardingType.COLUMN_WISE.value: _tt_sharding_class(CwPooledEmbeddingSharding),
    ShardingType.DATA_PARALLEL.value: _tt_sharding_class(DpPooledEmbeddingSharding),
    ShardingType.TABLE_ROW_WISE.value: _tt_sharding_class(TwRwPooledEmbeddingSharding),
}


@dataclass
class TTEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """Adds the per-group MEAN divisors of row-wise groups."""

    tt_divisors: list[Tensor | None] = field(default_factory=list)


class _DivideAwaitable(Awaitable[Tensor]):
    def __init__(self, inner: Awaitable[Tensor], divisor: Tensor) -> None:
        super().__init__()
        self._inner, self._divisor = inner, divisor

    def _wait_impl(self) -> Tensor:
        return self._inner.wait() / self._divisor


# ---------------------------------------------------------------------- checkpoint metadata
@dataclass
class _CkptEntry:
    """One checkpoint tensor of a table core (or optimizer state): its global shape and local piece."""

    global_shape: tuple[int, ...]
    sharded: bool  # True: ShardedTensor over the ranks in `shards`; False: plain (replicated) tensor
    shards: list[ShardMetadata]


def _placement(rank: int, device: torch.device) -> str:
    return f"rank:{rank}/cuda:{rank}" if device.type == "cuda" else f"rank:{rank}/{device.type}"


def _dtensor_api() -> tuple[type, type, type, type]:
    """``(DTensor, Shard, Replicate, LocalShardsWrapper)`` of this torch / torchrec.

    torchrec's ``LocalShardsWrapper`` (``torchrec.distributed.shards_wrapper``, present in
    1.6.1 .. 1.8.0) is preferred: ``KeyedOptimizer.load_state_dict`` recognises that class.
    """
    try:
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor import Shard as DShard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor, Replicate  # type: ignore[no-redef]
        from torch.distributed._tensor import Shard as DShard  # type: ignore[no-redef]
    try:
        from torchrec.distributed.shards_wrapper import LocalShardsWrapper
    except ImportError:
        try:
            from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper  # type: ignore[no-redef]
        except ImportError as e:
            raise NotImplementedError(
                "ShardingEnv(output_dtensor=True) needs LocalShardsWrapper (torchrec.distributed.shards_wrapper or "
                "torch.distributed.tensor._shards_wrapper), which this torch / torchrec lacks; use output_dtensor=False"
            ) from e
    return DTensor, DShard, Replicate, LocalShardsWrapper


def _is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
    return isinstance(value, DTensor)


def _local_shards_of(value: Any) -> tuple[list[Tensor], list[tuple[int, ...]]] | None:
    """Local pieces and global offsets of a DTensor built on a ``LocalShardsWrapper`` (else ``None``)."""
    local = value._local_tensor
    if not (hasattr(local, "local_shards") and hasattr(local, "local_offsets")):
        return None
    return list(local.local_shards()), [tuple(int(o) for o in off) for off in local.local_offsets()]


class TTFusedOptimizer(FusedOptimizer):
    """Keyed view of the fused optimizers of the local TT shards (the update runs in backward).

    ``step()`` only pushes the param groups' ``lr`` (e.g. from an LR scheduler) to the
    shards; ``zero_grad()`` is a no-op.

    Args:
        params (dict[str, Tensor]): checkpoint tensors of the local cores by FQN.
        state (dict): ``param -> {state_name: tensor}``.
        shards (list[TTLocalShard]): shards whose learning rate follows ``lr``.
        lr (float): initial learning rate.
        after_load (callable, optional): run (on every rank) when a state dict has been loaded (KeyedOptimizer's
            ``post_load_state_dict``, also reached through a ``CombinedOptimizer``), e.g. to copy state that
            the checkpoint holds once to its other replicas.
    """

    def __init__(
        self, params: dict[str, Any], state: dict[Any, Any], shards: list[TTLocalShard], lr: float,
        after_load: Callable[[], None] | None = None,
    ) -> None:
        self._shards = shards
        self._after_load = after_load
        super().__init__(params, state, [{"params": list(params.values()), "lr": lr}])

    def post_load_state_dict(self) -> None:
        super().post_load_state_dict()
        if self._after_load is not None:
            self._after_load()

    def step(self, closure: Any = None) -> None:
        lr = float(self.param_groups[0]["lr"])
        for shard in self._shards:
            if shard.optim.learning_rate != lr:
                shard.optim = TTFusedOptimizerSettings(shard.optim.optimizer, lr, shard.optim.eps)

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass


# ---------------------------------------------------------------------- sharded module
class ShardedTTEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, list[Tensor], KeyedTensor, TTEmbeddingBagCollectionContext],
    FusedOptimizerModule,
):
    """Sharded :class:`TTEmbeddingBagCollection` (built by :class:`TTEmbeddingBagCollectionSharder`).

    Args:
        module (TTEmbeddingBagCollection): the unsharded collection (meta allowed).
        table_name_to_parameter_sharding (dict[str, ParameterSharding]): the plan.
        env (ShardingEnv): process group, rank and world size.
        fused_params (dict, optional): default fused optimizer (see :func:`resolve_table_optimizer`).
        device (torch.device, optional): compute device.
        qcomm_codecs_registry (dict, optional): quantized comm codecs for the output dists.
    """

    def __init__(
        self,
        module: TTEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: dict[str, Any] | None = None,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._env = env
        self._device = device if device is not None else torch.device("cpu")
        self._configs: list[EmbeddingBagConfig] = list(module.embedding_bag_configs())
        self._plan = dict(table_name_to_parameter_sharding)
        self._is_weighted = module.is_weighted()
        self._validate(module)
        configs = {c.name: c for c in self._configs}
        optim = {
            c.name: resolve_table_optimizer(c.name, fused_params, list(module.embedding_bags[c.name].parameters()))
            for c in self._configs
        }
        self._table_optim = optim
        for c in self._configs:
            if not uses_cache(c):
                continue
            if self._plan[c.name].sharding_type == ShardingType.DATA_PARALLEL.value:
                raise ValueError(
                    f"table '{c.name}': use_cache=True is not supported with data_parallel sharding (every rank would "
                    "train its own copy of the cached rows); use table_wise, row_wise, column_wise or table_row_wise"
                )
            if (
                self._plan[c.name].sharding_type == ShardingType.COLUMN_WISE.value
                and optim[c.name].optimizer == FusedOptimizerKind.ROWWISE_ADAGRAD
            ):
                raise ValueError(
                    f"table '{c.name}': use_cache=True with column_wise sharding and row-wise Adagrad is not "
                    "supported (a cached row's state would need the squared gradient of the whole row, summed over "
                    "the column shards); use EXACT_ADAGRAD / EXACT_SGD or another sharding type"
                )
            if optim[c.name].optimizer is None:
                raise ValueError(
                    f"table '{c.name}': use_cache=True needs a fused optimizer (fused_params={{'optimizer': ...}} or "
                    "apply_optimizer_in_backward); cached rows are trained inside backward"
                )
        names_by_table = dict(zip([c.name for c in self._configs], get_embedding_names_by_table(self._configs), strict=True))
        infos: dict[str, list[EmbeddingShardingInfo]] = defaultdict(list)
        for c in self._configs:
            ps = self._plan[c.name]
            infos[ps.sharding_type].append(
                EmbeddingShardingInfo(
                    embedding_config=EmbeddingTableConfig(
                        num_embeddings=c.num_embeddings,
                        embedding_dim=c.embedding_dim,
                        name=c.name,
                        data_type=c.data_type,
                        feature_names=list(c.feature_names),
                        pooling=c.pooling,
                        is_weighted=self._is_weighted,
                        has_feature_processor=False,
                        embedding_names=names_by_table[c.name],
                    ),
                    param_sharding=ps,
                    param=torch.empty(c.num_embeddings, c.embedding_dim, device="meta"),
                    fused_params={},
                )
            )
        sources = dict(module.embedding_bags.items())
        self._sharding_types = [st for st in _SUPPORTED_SHARDING_TYPES if st in infos]
        self._shardings: list[EmbeddingSharding] = []
        for st in self._sharding_types:
            cls = _SHARDING_CLASSES[st]
            kwargs: dict[str, Any] = {}
            if st != ShardingType.DATA_PARALLEL.value:
                kwargs["qcomm_codecs_registry"] = qcomm_codecs_registry
            if st == ShardingType.COLUMN_WISE.value:
                kwargs["permute_embeddings"] = True
            sharding = cls(infos[st], env, self._device, **kwargs)
            sharding._tt_args = {
                "configs": configs, "sharding_type": st, "optim": optim, "sources": sources, "weighted": self._is_weighted,
            }
            self._shardings.append(sharding)
        self._lookups = nn.ModuleList(s.create_lookup(self._device) for s in self._shardings)
        self._output_dists = [s.create_output_dist(self._device) for s in self._shardings]
        self._input_dists: list[nn.Module] = []
        self._embedding_names = [n for s in self._shardings for n in s.embedding_names()]
        self._embedding_dims = [d for s in self._shardings for d in s.embedding_dims()]
        self._feature_splits = [len(s.feature_names()) for s in self._shardings]
        self._has_uninitialized_input_dist = True
        self._features_order: list[int] = []
        self._mean_columns: list[list[bool] | None] = [
            self._mean_positions(st, s, configs) for st, s in zip(self._sharding_types, self._shardings, strict=True)
        ]
        self._sync = self._build_sync()
        self._anchor = torch.zeros((), device=self._device, requires_grad=True)
        self._sync_replicated_cores()
        self._ckpt = self._build_checkpoint_entries()
        self._output_dtensor = self._check_output_dtensor(env)
        self._ckpt_tensors: dict[str, Any] = {}
        self._optim_state_tensors: dict[str, dict[str, Any]] = {}
        self._build_checkpoint_tensors()
        self._cache_ckpt = self._build_cache_entries()
        self._cache_ckpt_tensors = {
            key: self._make_distributed(local, entry.shards, entry.global_shape, 0, dtype)
            for key, (entry, local, dtype) in self._cache_ckpt.items()
        }
        self._optim = self._build_fused_optimizer()
        self._register_state_dict_hook(ShardedTTEmbeddingBagCollection._state_dict_hook)
        self._register_load_state_dict_pre_hook(self._load_state_dict_pre_hook, with_module=False)

    # ------------------------------------------------------------------ validation
    def _tables_of(self, sharding_type: str) -> list[str]:
        return [c.name for c in self._configs if self._plan[c.name].sharding_type == sharding_type]

    def _validate(self, module: TTEmbeddingBagCollection) -> None:
        """Check the whole plan before anything is built (clear errors, nothing half-applied)."""
        for c in self._configs:
            ps = self._plan.get(c.name)
            if ps is None:
                raise ValueError(f"ShardedTTEmbeddingBagCollection: the plan has no entry for table '{c.name}'")
            if ps.sharding_type not in _SUPPORTED_SHARDING_TYPES:
                raise ValueError(
                    f"table '{c.name}': sharding type {ps.sharding_type!r} is not supported for TT tables "
                    f"(supported: {list(_SUPPORTED_SHARDING_TYPES)})"
                )
            if ps.compute_kernel not in {k.value for k in EmbeddingComputeKernel}:
                raise ValueError(
                    f"table '{c.name}': compute kernel {ps.compute_kernel!r} is not an EmbeddingComputeKernel; "
                    f"use {TT_COMPUTE_KERNEL!r}"
                )
            p, q, _ = tt_config_shapes(c)
            p_inner, q_inner = math.prod(p[1:]), math.prod(q[1:])
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            if ps.sharding_type in _ROW_SHARDED:
                num_buckets = len(shards)
                if ps.sharding_type == ShardingType.TABLE_ROW_WISE.value:
                    from torchrec.distributed.comm import get_local_size

                    num_buckets = get_local_size(self._env.world_size)
                block = math.ceil(c.num_embeddings / num_buckets)
                for i, md in enumerate(shards):
                    off, rows = md.shard_offsets[0], md.shard_sizes[0]
                    if rows > 0 and off != (i % num_buckets) * block:
                        raise ValueError(
                            f"table '{c.name}' ({ps.sharding_type}): shard {i} starts at row {off}, but torchrec's input "
                            f"bucketization sends it rows from {(i % num_buckets) * block} (block {block}); uneven row "
                            "shards are not supported"
                        )
                if block % p_inner != 0 and num_buckets > 1:
                    raise ValueError(
                        f"table '{c.name}' ({ps.sharding_type}): row block ceil(num_embeddings / {num_buckets}) = {block} "
                        f"is not a multiple of prod(tt_p_shapes[1:]) = {p_inner}, so a rank's rows are not whole "
                        "first-core slices; pad the table with torchrec_tt.modules.align_config_for_row_wise(config, "
                        f"{num_buckets}) or choose tt_p_shapes accordingly"
                    )
            if ps.sharding_type == ShardingType.COLUMN_WISE.value:
                for md in shards:
                    if md.shard_offsets[1] % q_inner or md.shard_sizes[1] % q_inner:
                        raise ValueError(
                            f"table '{c.name}' (column_wise): column shard [{md.shard_offsets[1]}, "
                            f"{md.shard_offsets[1] + md.shard_sizes[1]}) is not made of whole first-core slices of "
                            f"prod(tt_q_shapes[1:]) = {q_inner} columns"
                        )
        extra = set(self._plan) - {c.name for c in self._configs}
        if extra:
            raise ValueError(f"ShardedTTEmbeddingBagCollection: the plan names unknown tables {sorted(extra)}")

    # ------------------------------------------------------------------ replicated cores
    def _local_shards(self) -> list[TTLocalShard]:
        return [s for lookup in self._lookups for s in lookup.local_shards()]

    def _build_sync(self) -> TTStepSync:
        layout: dict[tuple[str, Any], tuple[int, int]] = {}
        off = 0
        dp_tables: set[str] = set()
        for c in sorted(self._configs, key=lambda c: c.name):
            st = self._plan[c.name].sharding_type
            p, q, r = tt_config_shapes(c)
            ks = range(len(p)) if st == ShardingType.DATA_PARALLEL.value else range(1, len(p))
            if st == ShardingType.TABLE_WISE.value:
                ks = range(0)
            if st == ShardingType.DATA_PARALLEL.value:
                dp_tables.add(c.name)
            for k in ks:
                n = p[k] * r[k] * q[k] * r[k + 1]
                layout[(c.name, k)] = (off, n)
                off += n
            if st == ShardingType.COLUMN_WISE.value and self._table_optim[c.name].optimizer == FusedOptimizerKind.ROWWISE_ADAGRAD:
                layout[(c.name, "sumsq0")] = (off, p[0])
                off += p[0]
        return TTStepSync(layout, dp_tables, self._env.process_group, self._env.world_size, self._device)

    def _owner_rank(self, table: str) -> int:
        ps = self._plan[table]
        return min(ps.ranks) if ps.ranks else 0

    @torch.no_grad()
    def _sync_replicated_cores(self) -> None:
        """Make every replica of a replicated core identical (the owner rank's values)."""
        if self._env.world_size <= 1 or self._sync.total == 0 or self._device.type == "meta":
            return
        buf = torch.zeros(self._sync.total, device=self._device)
        done: set[tuple[str, Any]] = set()
        for shard in self._local_shards():
            if self._env.rank != self._owner_rank(shard.table_name):
                continue
            for k in shard.replicated:
                key = (shard.table_name, k)
                if key in done:
                    continue
                done.add(key)
                off, n = self._sync.layout[key]
                buf[off : off + n] = shard.cores[k].reshape(-1)
        dist.all_reduce(buf, group=self._env.process_group)
        for shard in self._local_shards():
            for k in shard.replicated:
                off, n = self._sync.layout[(shard.table_name, k)]
                shard.cores[k].copy_(buf[off : off + n].view_as(shard.cores[k]))

    # ------------------------------------------------------------------ torchrec plumbing
    def create_context(self) -> TTEmbeddingBagCollectionContext:
        return TTEmbeddingBagCollectionContext()

    @property
    def unsharded_module_type(self) -> type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def _create_input_dist(self, input_feature_names: list[str]) -> None:
        names = [f for s in self._shardings for f in s.feature_names()]
        missing = sorted(set(names) - set(input_feature_names))
        if missing:
            raise KeyError(f"ShardedTTEmbeddingBagCollection: features {missing} are missing from the input KJT")
        self._input_dists = [s.create_input_dist() for s in self._shardings]
        if names != list(input_feature_names):
            self._features_order = [input_feature_names.index(f) for f in names]
            self.register_buffer(
                "_features_order_tensor",
                torch.tensor(self._features_order, device=self._device, dtype=torch.int32),
                persistent=False,
            )
        self._has_uninitialized_input_dist = False

    def input_dist(
        self, ctx: TTEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        if self._has_uninitialized_input_dist:
            self._create_input_dist(features.keys())
        with torch.no_grad():
            if self._features_order:
                features = features.permute(self._features_order, self._features_order_tensor)
            awaitables = []
            for input_dist, f, is_mean, sharding in zip(
                self._input_dists, features.split(self._feature_splits), self._mean_columns, self._shardings, strict=True
            ):
                ctx.tt_divisors.append(
                    self._mean_divisor(f, is_mean, sharding.embedding_dims()) if is_mean is not None else None
                )
                awaitables.append(input_dist(f))
                ctx.sharding_contexts.append(
                    EmbeddingShardingContext(
                        batch_size_per_feature_pre_a2a=f.stride_per_key(),
                        variable_batch_per_feature=f.variable_stride_per_key(),
                    )
                )
            return KJTListSplitsAwaitable(awaitables, ctx)

    @staticmethod
    def _mean_positions(
        sharding_type: str, sharding: EmbeddingSharding, configs: dict[str, EmbeddingBagConfig]
    ) -> list[bool] | None:
        """Per input feature of a row-sharded group: is it MEAN-pooled (divided after the reduce-scatter)."""
        if sharding_type not in _ROW_SHARDED:
            return None
        if sharding_type == ShardingType.TABLE_ROW_WISE.value:
            groups = [g for node in sharding._grouped_embedding_configs_per_node for g in node]  # type: ignore[attr-defined]
        else:
            groups = sharding._grouped_embedding_configs  # type: ignore[attr-defined]
        positions = [
            configs[t.name].pooling == PoolingType.MEAN for g in groups for t in g.embedding_tables for _ in t.feature_names
        ]
        return positions if any(positions) else None

    @staticmethod
    def _mean_divisor(features: KeyedJaggedTensor, is_mean: list[bool], dims: list[int]) -> Tensor:
        """``(B, sum dims)`` divisor of a row-sharded group: bag length for MEAN features, 1 otherwise."""
        batch = features.stride()
        lengths = features.lengths().view(-1, batch)
        cols = []
        for i, (mean, dim) in enumerate(zip(is_mean, dims, strict=True)):
            col = lengths[i].clamp(min=1).float() if mean else torch.ones(batch, device=lengths.device)
            cols.append(col.unsqueeze(1).expand(batch, dim))
        return torch.cat(cols, dim=1)

    def compute(self, ctx: TTEmbeddingBagCollectionContext, dist_input: KJTList) -> list[Tensor]:
        if torch.is_grad_enabled():
            state = self._sync.new_step()
            anchor = _TTSyncPoint.apply(self._anchor, self._sync, state)
            return [lookup.lookup(f, anchor, state) for lookup, f in zip(self._lookups, dist_input, strict=True)]
        return [lookup.lookup(f, None, None) for lookup, f in zip(self._lookups, dist_input, strict=True)]

    def output_dist(self, ctx: TTEmbeddingBagCollectionContext, output: list[Tensor]) -> LazyAwaitable[KeyedTensor]:
        awaitables: list[Awaitable[Tensor]] = []
        for i, (dist_, sctx, out) in enumerate(zip(self._output_dists, ctx.sharding_contexts, output, strict=True)):
            aw = dist_(out, sctx)
            divisor = ctx.tt_divisors[i] if i < len(ctx.tt_divisors) else None
            awaitables.append(_DivideAwaitable(aw, divisor) if divisor is not None else aw)
        return EmbeddingBagCollectionAwaitable(
            awaitables=awaitables, embedding_dims=self._embedding_dims, embedding_names=self._embedding_names
        )

    def compute_and_output_dist(self, ctx: TTEmbeddingBagCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name, _ in self.named_parameters(prefix=prefix):
            yield name

    # ------------------------------------------------------------------ checkpoint
    def _build_checkpoint_entries(self) -> dict[str, _CkptEntry]:
        """Global shape and sharding of every checkpoint tensor, from the global plan (no comms)."""
        entries: dict[str, _CkptEntry] = {}
        dev = self._device if self._device.type != "meta" else torch.device("cpu")
        for c in self._configs:
            ps = self._plan[c.name]
            p, q, r = tt_config_shapes(c)
            p_inner, q_inner = math.prod(p[1:]), math.prod(q[1:])
            sharded = ps.sharding_type in (*_ROW_SHARDED, ShardingType.COLUMN_WISE.value)
            for k in range(len(p)):
                key = self._core_key(c, k)
                shape = (c.num_embeddings, c.embedding_dim) if not is_tt_config(c) else (r[k], p[k], q[k], r[k + 1])
                if not (sharded and k == 0):
                    entries[key] = _CkptEntry(shape, False, [])
                    continue
                metas = []
                for md, rank in zip(ps.sharding_spec.shards, ps.ranks, strict=True):
                    row_off, rows = md.shard_offsets[0], md.shard_sizes[0]
                    col_off, cols = md.shard_offsets[1], md.shard_sizes[1]
                    if rows == 0 or cols == 0:
                        continue
                    if not is_tt_config(c):
                        metas.append(ShardMetadata([row_off, col_off], [rows, cols], _placement(rank, dev)))
                        continue
                    a = row_off // p_inner
                    b = p[0] if row_off + rows == c.num_embeddings else math.ceil((row_off + rows) / p_inner)
                    metas.append(
                        ShardMetadata([0, a, col_off // q_inner, 0], [1, b - a, cols // q_inner, r[1]], _placement(rank, dev))
                    )
                entries[key] = _CkptEntry(shape, True, metas)
        return entries

    def _build_cache_entries(self) -> dict[str, tuple[_CkptEntry, Tensor | None, torch.dtype]]:
        """Checkpoint layout of the LFU caches: per buffer, one 1-D tensor with a block per table shard.

        The blocks follow the plan's shard order, so a cache checkpoint loads into the same
        shard layout (placement on other ranks is fine); the validation in the load hook
        refuses any other layout.
        """
        entries: dict[str, tuple[_CkptEntry, Tensor | None, torch.dtype]] = {}
        dev = self._device if self._device.type != "meta" else torch.device("cpu")
        shard_of = {s.table_name: s for s in self._local_shards()}
        for c in self._configs:
            if not uses_cache(c):
                continue
            ps = self._plan[c.name]
            local = shard_of.get(c.name)
            local_cache = local.cache if local is not None else None
            specs = [(md, rank) for md, rank in zip(ps.sharding_spec.shards, ps.ranks, strict=True) if md.shard_sizes[0] > 0]
            opt = self._table_optim[c.name].optimizer
            layouts = [TTRowCache.buffer_layout(c.cache_size, md.shard_sizes[1], c.hashtbl_size, opt) for md, _ in specs]
            for name, (_, dtype) in layouts[0].items():
                metas, offset = [], 0
                for (_, rank), layout in zip(specs, layouts, strict=True):
                    n = layout[name][0]
                    metas.append(ShardMetadata([offset], [n], _placement(rank, dev)))
                    offset += n
                tensor = getattr(local_cache, name).view(-1) if local_cache is not None else None
                entries[f"embedding_bags.{c.name}.cache.{name}"] = (_CkptEntry((offset,), True, metas), tensor, dtype)
        return entries

    @staticmethod
    def _core_key(config: EmbeddingBagConfig, k: int) -> str:
        return f"embedding_bags.{config.name}.canonical_cores.{k}" if is_tt_config(config) else f"embedding_bags.{config.name}.weight"

    def _canonical_local(self, shard: TTLocalShard, k: int, tensor: Tensor) -> Tensor:
        if not shard.is_tt:
            return tensor
        return internal_to_canonical(tensor, shard.ranks[k], shard.q[k], shard.ranks[k + 1])

    @staticmethod
    def _check_output_dtensor(env: ShardingEnv) -> bool:
        """``env.output_dtensor`` (torchrec's switch, in ShardingEnv since before 1.6.1), validated."""
        if not getattr(env, "output_dtensor", False):
            return False
        if getattr(env, "device_mesh", None) is None:
            raise ValueError(
                "ShardedTTEmbeddingBagCollection: ShardingEnv(output_dtensor=True) has no device_mesh (it needs a "
                "process group); build it with ShardingEnv(world_size, rank, pg, output_dtensor=True)"
            )
        _dtensor_api()  # fail now, with a clear error, if this torch / torchrec lacks the pieces
        return True

    def _shard_dim(self, config: EmbeddingBagConfig) -> int:
        """The dimension that the shards of a sharded first core (or plain table) split."""
        cw = self._plan[config.name].sharding_type == ShardingType.COLUMN_WISE.value
        return (2 if cw else 1) if is_tt_config(config) else (1 if cw else 0)

    def _make_dtensor(
        self, local: Tensor | None, metas: list[ShardMetadata], shape: tuple[int, ...], dim: int
    ) -> Any:
        """DTensor twin of :meth:`_make_sharded`, built as torchrec builds its own (``LocalShardsWrapper``).

        The placement ``Shard(dim)`` on ``env.device_mesh`` is nominal (shards may be uneven, on a
        subset of the ranks, or absent); the local piece (a view of the parameter, so that
        ``dcp.load`` writes in place) and its global offsets are in the wrapper, which DCP uses.
        """
        DTensor, DShard, Replicate, LocalShardsWrapper = _dtensor_api()
        me = self._env.rank
        mine = [m for m in metas if m.placement.rank() == me] if local is not None else []
        wrapper = LocalShardsWrapper(
            local_shards=[local] if mine else [], local_offsets=[tuple(mine[0].shard_offsets)] if mine else []
        )
        mesh = self._env.device_mesh
        placements = (Replicate(),) * (mesh.ndim - 1) + (DShard(dim),)
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        out = DTensor.from_local(
            wrapper, device_mesh=mesh, placements=placements, shape=torch.Size(shape), stride=stride, run_check=False
        )
        if not mine:
            # An empty LocalShardsWrapper advertises one 2-D [0, 0] chunk, which DCP's resharding
            # indexes against the saved chunks' dims (IndexError for 1-D optimizer state); it
            # holds nothing, so advertise no chunk (from_local wrapped a copy: patch that one).
            out._local_tensor._storage_meta.chunks = []
        return out

    def _make_distributed(
        self, local: Tensor | None, metas: list[ShardMetadata], shape: tuple[int, ...], dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> Any:
        """A ShardedTensor, or a DTensor when the env asks for DTensor output."""
        if self._output_dtensor:
            return self._make_dtensor(local, metas, shape, dim)
        return self._make_sharded(local, metas, shape, dtype)

    def _make_sharded(
        self, local: Tensor | None, metas: list[ShardMetadata], shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> ShardedTensor:
        me = self._env.rank
        shards = [Shard(tensor=local, metadata=m) for m in metas if m.placement.rank() == me and local is not None]
        gmeta = ShardedTensorMetadata(
            shards_metadata=metas, size=torch.Size(shape), tensor_properties=TensorProperties(dtype=dtype)
        )
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, gmeta, process_group=self._env.process_group
        )

    def _build_checkpoint_tensors(self) -> None:
        """Checkpoint views of the local cores and optimizer states (built once, they alias the storage)."""
        by_table: dict[str, list[TTLocalShard]] = defaultdict(list)
        for s in self._local_shards():
            by_table[s.table_name].append(s)
        for c in self._configs:
            shards = by_table.get(c.name, [])
            if len(shards) > 1:
                raise NotImplementedError(
                    f"table '{c.name}': {len(shards)} shards of one table on rank {self._env.rank} are not supported"
                )
            shard = shards[0] if shards else None
            opt = self._table_optim[c.name].optimizer
            for k in range(len(tt_config_shapes(c)[0])):
                key = self._core_key(c, k)
                entry = self._ckpt[key]
                local = self._canonical_local(shard, k, shard.cores[k].detach()) if shard is not None else None
                state_name = f"{c.name}.cores.{k}.momentum1" if is_tt_config(c) else f"{c.name}.momentum1"
                state_local = None
                if shard is not None and opt in (FusedOptimizerKind.ADAGRAD, FusedOptimizerKind.ROWWISE_ADAGRAD):
                    st = getattr(shard, f"optimizer_state_{k}")
                    state_local = self._canonical_local(shard, k, st) if opt == FusedOptimizerKind.ADAGRAD else st
                if entry.sharded:
                    dim = self._shard_dim(c)
                    self._ckpt_tensors[key] = self._make_distributed(local, entry.shards, entry.global_shape, dim)
                    if opt == FusedOptimizerKind.ADAGRAD:
                        self._optim_state_tensors[key] = {
                            state_name: self._make_distributed(state_local, entry.shards, entry.global_shape, dim)
                        }
                    elif opt == FusedOptimizerKind.ROWWISE_ADAGRAD:
                        self._optim_state_tensors[key] = {state_name: self._rowwise_state_tensor(c, entry, state_local)}
                elif shard is not None:
                    self._ckpt_tensors[key] = local
                    if state_local is not None:
                        self._optim_state_tensors[key] = {state_name: state_local}

    def _rowwise_state_tensor(self, config: EmbeddingBagConfig, entry: _CkptEntry, local: Tensor | None) -> Any:
        """Row-wise state of a sharded first core: sharded by rows (RW), or (CW) held by the table's owner rank.

        Column-wise, every rank with a column shard holds the same state (its updates use the all-reduced
        row norms); the checkpoint takes the owner's copy, a one-piece distributed tensor that every rank
        has (also ranks without a column shard), and ``_broadcast_cw_rowwise_states`` gives a loaded state
        to the other holders.
        """
        dim = 1 if is_tt_config(config) else 0
        if self._plan[config.name].sharding_type == ShardingType.COLUMN_WISE.value:
            owner = self._owner_rank(config.name)
            placement = next(str(m.placement) for m in entry.shards if m.placement.rank() == owner)
            n = entry.global_shape[dim]
            return self._make_distributed(local if self._env.rank == owner else None, [ShardMetadata([0], [n], placement)], (n,), 0)
        metas = [
            ShardMetadata([m.shard_offsets[dim]], [m.shard_sizes[dim]], str(m.placement)) for m in entry.shards
        ]
        return self._make_distributed(local, metas, (entry.global_shape[dim],), 0)

    @torch.no_grad()
    def _broadcast_cw_rowwise_states(self) -> None:
        """After a load: the owner's row-wise state of each column-wise first core to the table's other ranks."""
        if self._env.world_size <= 1 or self._device.type == "meta":
            return
        shard_of = {s.table_name: s for s in self._local_shards()}
        for c in sorted(self._configs, key=lambda c: c.name):
            ps = self._plan[c.name]
            if ps.sharding_type != ShardingType.COLUMN_WISE.value or len(set(ps.ranks or [])) <= 1:
                continue
            if self._table_optim[c.name].optimizer != FusedOptimizerKind.ROWWISE_ADAGRAD:
                continue
            shard = shard_of.get(c.name)
            buf = shard.optimizer_state_0 if shard is not None else torch.zeros(
                tt_config_shapes(c)[0][0], device=self._device
            )
            dist.broadcast(buf, group=self._env.process_group, group_src=self._owner_rank(c.name))

    def _build_fused_optimizer(self) -> KeyedOptimizer:
        fused = {c.name for c in self._configs if self._table_optim[c.name].optimizer is not None}
        if not fused:
            return EmptyFusedOptimizer()
        lrs = {self._table_optim[n].learning_rate for n in fused}
        if len(lrs) > 1:
            logger.warning("TT tables have different learning rates %s; the fused optimizer's lr group uses the first", lrs)
        params: dict[str, Any] = {}
        state: dict[Any, Any] = {}
        for c in self._configs:
            if c.name not in fused:
                continue
            for k in range(len(tt_config_shapes(c)[0])):
                key = self._core_key(c, k)
                if key not in self._ckpt_tensors:
                    continue
                params[key] = self._ckpt_tensors[key]
                state[params[key]] = self._optim_state_tensors.get(key, {})
        shards = [s for s in self._local_shards() if s.table_name in fused]
        return TTFusedOptimizer(params, state, shards, next(iter(lrs)), self._broadcast_cw_rowwise_states)

    @staticmethod
    def _state_dict_hook(module: ShardedTTEmbeddingBagCollection, destination: dict[str, Any], prefix: str, _meta: Any) -> dict[str, Any]:
        for key in [k for k in destination if k.startswith(prefix + "_lookups.")]:
            del destination[key]
        for key, tensor in module._ckpt_tensors.items():
            destination[prefix + key] = tensor
        for key, tensor in module._cache_ckpt_tensors.items():
            destination[prefix + key] = tensor
        return destination

    def _load_state_dict_pre_hook(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # 1. validate every entry before anything is copied
        copies: list[tuple[TTLocalShard, int, Tensor]] = []
        shard_of = {s.table_name: s for s in self._local_shards()}
        for c in self._configs:
            for k in range(len(tt_config_shapes(c)[0])):
                key = self._core_key(c, k)
                value = state_dict.get(prefix + key)
                if value is None:
                    if key in self._ckpt_tensors or self._ckpt[key].sharded:
                        missing_keys.append(prefix + key)
                    continue
                entry = self._ckpt[key]
                if tuple(value.shape) != entry.global_shape:
                    raise RuntimeError(
                        f"ShardedTTEmbeddingBagCollection: checkpoint tensor {prefix + key} has shape "
                        f"{tuple(value.shape)}, table '{c.name}' expects {entry.global_shape} "
                        f"(tt_p_shapes/tt_q_shapes/tt_ranks = {tt_config_shapes(c)}); nothing was loaded"
                    )
                if _is_dtensor(value) and _local_shards_of(value) is None:
                    # a regular DTensor: gather it on every rank (a collective), also on ranks without a shard
                    value = value.full_tensor()
                shard = shard_of.get(c.name)
                if shard is None:
                    continue
                copies.append((shard, k, self._local_piece(value, shard, k, entry, key)))
        cache_copies = self._validate_cache_state(state_dict, prefix)
        # 2. copy
        with torch.no_grad():
            for shard, k, piece in copies:
                target = self._canonical_local(shard, k, shard.cores[k].data)
                if piece.data_ptr() != target.data_ptr():
                    target.copy_(piece)
            for target, piece in cache_copies:
                if piece.data_ptr() != target.data_ptr():
                    target.copy_(piece)
        for c in self._configs:
            for k in range(len(tt_config_shapes(c)[0])):
                state_dict.pop(prefix + self._core_key(c, k), None)
        for key in self._cache_ckpt:
            state_dict.pop(prefix + key, None)
        for name, param in self.named_parameters():
            state_dict[prefix + name] = param
        for name, buf in self.named_buffers():
            if ".cache." in name:
                state_dict[prefix + name] = buf

    def _validate_cache_state(self, state_dict: dict[str, Any], prefix: str) -> list[tuple[Tensor, Tensor]]:
        """Pieces of the cache checkpoint to copy (validated); a checkpoint without caches empties them."""
        copies: list[tuple[Tensor, Tensor]] = []
        tables = {key.split(".")[1] for key in self._cache_ckpt}
        for table in sorted(tables):
            keys = [k for k in self._cache_ckpt if k.split(".")[1] == table]
            present = [k for k in keys if prefix + k in state_dict]
            if not present:
                for shard in self._local_shards():
                    if shard.table_name == table and shard.cache is not None:
                        logger.info("table '%s': the checkpoint has no cache; starting with an empty one", table)
                        fresh = shard.cache.empty_state()
                        copies.extend((buf, fresh[name]) for name, buf in shard.cache.named_buffers())
                continue
            for key in keys:
                entry, local, _ = self._cache_ckpt[key]
                value = state_dict.get(prefix + key)
                if value is None or tuple(value.shape) != entry.global_shape:
                    raise RuntimeError(
                        f"ShardedTTEmbeddingBagCollection: table '{table}': checkpoint cache tensor {prefix + key} "
                        f"{'is missing' if value is None else f'has shape {tuple(value.shape)}'}, this plan's cache "
                        f"needs {entry.global_shape} (cache_size, hashtbl_size, optimizer and the table's shard layout "
                        "must match the saved ones; call cache_flush() before saving to move a table to another "
                        "layout); nothing was loaded"
                    )
                if local is not None:
                    copies.append((local, self._local_piece(value, None, 0, entry, key)))  # type: ignore[arg-type]
        saved = {k[len(prefix) :].split(".")[1] for k in state_dict if k.startswith(prefix + "embedding_bags.") and ".cache." in k}
        for table in sorted(saved - tables):
            raise RuntimeError(
                f"ShardedTTEmbeddingBagCollection: the checkpoint holds an LFU cache for table '{table}', which has "
                "use_cache=False here; loading it would lose the cached rows' training (call cache_flush() before "
                "saving); nothing was loaded"
            )
        return copies

    def _local_piece(self, value: Any, shard: TTLocalShard, k: int, entry: _CkptEntry, key: str) -> Tensor:
        """This rank's part of a checkpoint tensor (ShardedTensor, DTensor or full tensor)."""
        pieces: list[tuple[Tensor, list[int], list[int]]] | None = None
        if isinstance(value, ShardedTensor):
            kind = "ShardedTensor"
            pieces = [
                (s.tensor, list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)) for s in value.local_shards()
            ]
        elif _is_dtensor(value) and (local := _local_shards_of(value)) is not None:
            kind = "DTensor (LocalShardsWrapper)"
            pieces = [(t, list(off), list(t.shape)) for t, off in zip(*local, strict=True)]
        if pieces is not None:
            want = [m for m in entry.shards if m.placement.rank() == self._env.rank] if entry.sharded else None
            if len(pieces) == 1 and (
                want is None and pieces[0][2] == list(entry.global_shape) and not any(pieces[0][1])
                or want and pieces[0][1] == list(want[0].shard_offsets) and pieces[0][2] == list(want[0].shard_sizes)
            ):
                return pieces[0][0]
            raise RuntimeError(
                f"ShardedTTEmbeddingBagCollection: {key} is a {kind} laid out for another plan; load it with "
                "torch.distributed.checkpoint into this module's own state_dict() first; nothing was loaded"
            )
        full = value  # a plain tensor (regular DTensors were gathered by the caller)
        if entry.sharded:
            idx = tuple(slice(o, o + n) for o, n in zip(self._my_meta(entry).shard_offsets, self._my_meta(entry).shard_sizes, strict=True))
            return full[idx]
        return full

    def _my_meta(self, entry: _CkptEntry) -> ShardMetadata:
        return next(m for m in entry.shards if m.placement.rank() == self._env.rank)

    def load_optimizer_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``fused_optimizer.state_dict()`` output (validated before anything is copied)."""
        self._optim.load_state_dict(state_dict)

    def extra_repr(self) -> str:
        return f"plan={ {n: (p.sharding_type, p.ranks) for n, p in self._plan.items()} }"


# ---------------------------------------------------------------------- sharder
class TTEmbeddingBagCollectionSharder(BaseEmbeddingSharder[TTEmbeddingBagCollection]):
    """``ModuleSharder`` for :class:`TTEmbeddingBagCollection` (TT and plain tables).

    Args:
        fused_params (dict, optional): default fused optimizer of every table:
            ``{"optimizer": EmbOptimType.EXACT_SGD | EXACT_ADAGRAD | EXACT_ROWWISE_ADAGRAD,
            "learning_rate": float, "eps": float}``; tables tagged by
            ``apply_optimizer_in_backward`` use their tag instead. Without either,
            the cores get ``.grad`` (train them with a dense optimizer).
        qcomm_codecs_registry (dict, optional): quantized comm codecs (FP16/BF16 work on
            every backend).
        **kwargs: passed to ``BaseEmbeddingSharder``.

    Raises:
        ValueError / NotImplementedError: for an unknown or unsupported optimizer.

    Example::

        >>> sharder = TTEmbeddingBagCollectionSharder(
        ...     fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.05})
        >>> model = DistributedModelParallel(model, sharders=[sharder, *get_default_sharders()], plan=plan)
    """

    def __init__(
        self,
        fused_params: dict[str, Any] | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        **kwargs: Any,
    ) -> None:
        if fused_params and fused_params.get("optimizer") is not None:
            try:
                to_fused_optimizer(fused_params["optimizer"])
            except (ValueError, NotImplementedError) as e:
                raise type(e)(f"TTEmbeddingBagCollectionSharder: fused_params['optimizer']: {e}") from None
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry, **kwargs)

    def shard(
        self,
        module: TTEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan | dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedTTEmbeddingBagCollection:
        return ShardedTTEmbeddingBagCollection(
            module, dict(params), env, fused_params=self.fused_params, device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
        )

    @property
    def module_type(self) -> type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def shardable_parameters(self, module: TTEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        """Logical ``N x D`` meta proxies: they give plans and the planner each table's shape."""
        out: dict[str, nn.Parameter] = OrderedDict()
        for c in module.embedding_bag_configs():
            proxy = nn.Parameter(torch.empty(c.num_embeddings, c.embedding_dim, device="meta"), requires_grad=False)
            src = next(iter(module.embedding_bags[c.name].parameters()))
            for attr in ("_optimizer_classes", "_optimizer_kwargs", "_in_backward_optimizers"):
                if hasattr(src, attr):
                    setattr(proxy, attr, getattr(src, attr))
            out[c.name] = proxy
        return out

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(_SUPPORTED_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [TT_COMPUTE_KERNEL]
