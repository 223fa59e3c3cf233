"""Planner plugin: TT tables at their real size and cost in torchrec's ``EmbeddingShardingPlanner``.

The stock estimators size a table from its logical ``N x D`` weight and reject the
``customized_kernel`` compute kernel; torchrec >= 1.7 also ignores
``ModuleSharder.storage_usage()``. :class:`TTStorageEstimator` and
:class:`TTPerfEstimator` handle the sharding options of
``TTEmbeddingBagCollection`` tables themselves and delegate every other option
(stock ``EmbeddingBagCollection`` tables of a mixed model) to the stock
estimators; their ``estimate(options, *args, **kwargs)`` accepts both the 1.6
(``sharder_map``) and the 1.7+ (``sharder_data_map``) signatures.
:func:`make_tt_planner` builds a planner with them, plus per-table constraints
that keep row-wise / column-wise shards aligned with the TT cores.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import Perf, ShardEstimator, ShardingOption, Storage
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_tt.distributed.tt_embeddingbag import TT_COMPUTE_KERNEL, resolve_table_optimizer
from torchrec_tt.modules.tt_cache import TTRowCache
from torchrec_tt.modules.tt_embedding_configs import tt_config_shapes, uses_cache
from torchrec_tt.modules.tt_embedding_modules import TTEmbeddingBagCollection
from torchrec_tt.modules.tt_shapes import tt_flops_per_row
from torchrec_tt.ops import FusedOptimizer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FLOPS_PER_BYTE",
    "TTPerfEstimator",
    "TTStorageEstimator",
    "make_tt_planner",
    "tt_compute_scale",
    "tt_parameter_constraints",
    "tt_shard_bytes",
]

_ROW_SHARDED = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


def _tt_option(option: ShardingOption) -> tuple[TTEmbeddingBagCollection, EmbeddingBagConfig] | None:
    module = option.module[1]
    if not isinstance(module, TTEmbeddingBagCollection):
        return None
    return module, next(c for c in module.embedding_bag_configs() if c.name == option.name)


def tt_shard_bytes(
    config: EmbeddingBagConfig,
    shard_rows: int,
    shard_cols: int,
    optimizer: FusedOptimizer | None,
    element_size: int = 4,
) -> int:
    """Bytes a rank holds for a shard of a table: its cores plus fused optimizer state (plus its cache).

    A row shard holds whole first-core slices and full inner cores; a column shard
    a ``q_1`` slice of the first core and full inner cores. Adagrad keeps one state
    value per core entry, row-wise Adagrad one per core slice, SGD none. A table
    with ``use_cache=True`` adds, per shard, the bytes of its cache's buffers (rows,
    optimizer state, ids, hash table: :meth:`TTRowCache.buffer_layout`).

    Args:
        config (EmbeddingBagConfig): the table (plain tables are one-core TTs).
        shard_rows (int): rows of the shard.
        shard_cols (int): columns of the shard.
        optimizer (FusedOptimizer, optional): the table's fused optimizer.
        element_size (int): bytes per core entry.

    Returns:
        int: bytes.

    Example::

        >>> from torchrec_tt.modules.tt_embedding_configs import TTEmbeddingBagConfig
        >>> cfg = TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=8, feature_names=["f"],
        ...                            tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 2, 2], tt_ranks=[4, 4])
        >>> tt_shard_bytes(cfg, 1000, 8, None)
        1920
    """
    p, q, r = tt_config_shapes(config)
    p1 = min(p[0], math.ceil(shard_rows / math.prod(p[1:])))
    q1 = max(1, shard_cols // math.prod(q[1:]))
    local_p = [p1, *p[1:]]
    local_q = [q1, *q[1:]]
    entries = sum(local_p[k] * r[k] * local_q[k] * r[k + 1] for k in range(len(p)))
    state = 0
    if optimizer == FusedOptimizer.ADAGRAD:
        state = entries
    elif optimizer == FusedOptimizer.ROWWISE_ADAGRAD:
        state = sum(local_p)
    total = (entries + state) * element_size
    if uses_cache(config) and shard_rows > 0:
        layout = TTRowCache.buffer_layout(config.cache_size, shard_cols, config.hashtbl_size, optimizer)
        total += sum(numel * dtype.itemsize for numel, dtype in layout.values())
    return total


class TTStorageEstimator(ShardEstimator):
    """Storage of TT-collection shards: real core + optimizer bytes + input/output buffers.

    Args:
        topology (Topology): the planner's topology.
        constraints (dict[str, ParameterConstraints], optional): as for the stock estimator.
        fused_params (dict, optional): the TT sharder's ``fused_params`` (optimizer state size).
    """

    def __init__(
        self,
        topology: Topology,
        constraints: dict[str, ParameterConstraints] | None = None,
        fused_params: dict[str, Any] | None = None,
    ) -> None:
        self._topology = topology
        self._inner = EmbeddingStorageEstimator(topology=topology, constraints=constraints)
        self._fused_params = fused_params

    def estimate(self, sharding_options: list[ShardingOption], *args: Any, **kwargs: Any) -> None:
        stock = [o for o in sharding_options if _tt_option(o) is None]
        if stock:
            self._inner.estimate(stock, *args, **kwargs)
        for option in sharding_options:
            found = _tt_option(option)
            if found is None:
                continue
            module, config = found
            params = list(module.embedding_bags[config.name].parameters())
            optimizer = resolve_table_optimizer(config.name, self._fused_params, params).optimizer
            pooling = sum(option.input_lengths) if option.input_lengths else 1.0
            for shard in option.shards:
                rows, cols = shard.size[0], shard.size[1]
                weights = tt_shard_bytes(config, rows, cols, optimizer)
                io = math.ceil(option.batch_size * pooling * 8 + option.batch_size * len(config.feature_names) * cols * 4)
                total = weights + io
                if self._topology.compute_device == "cuda":
                    shard.storage = Storage(hbm=total, ddr=0)
                else:
                    shard.storage = Storage(hbm=0, ddr=total)


#: FLOPs a device does in the time a dense fused lookup streams one byte, fitted to measured
#: TT / dense step times (forward + backward + fused SGD, B = 4096 x 20, q = [4, 4, 4]):
#: CPU (2 cores, the C++ kernels with the backward's prefix reuse,
#: ``benchmarks/results/2026-12-06h_cpu2_tt_vs_dense_by_rank.md``): TT / dense 1.3 / 1.8 / 3.3 / 12
#: at ranks 8 / 16 / 32 / 64; CUDA (one H100, kernels v11,
#: ``benchmarks/results/2026-12-06g_NVIDIA-H100_cuda.md``): 2.06 at ranks 32 (the only rank measured).
DEFAULT_FLOPS_PER_BYTE = {"cpu": 200.0, "cuda": 576.0}


def tt_compute_scale(config: EmbeddingBagConfig, flops_per_byte: float) -> float:
    """A TT table's lookup compute relative to a dense fused lookup of the same table.

    ``1 + tt_flops_per_row / (embedding_dim * flops_per_byte)``: the sort, dedup and pooling a
    dense lookup also pays, plus the contraction of a row (``tt_flops_per_row`` FLOPs where a
    dense table streams ``4 * embedding_dim`` bytes). With :data:`DEFAULT_FLOPS_PER_BYTE` it is
    within 20% of the measured step ratios above (CPU: 1.24 / 1.80 / 3.88 / 11.9 against 1.28 /
    1.80 / 3.34 / 11.8); the former ``max(1, flops / (4 * embedding_dim))`` said 144 where 3.3 and
    2.1 were measured.

    Args:
        config (EmbeddingBagConfig): a TT table's config (``tt_config_shapes`` reads its shapes).
        flops_per_byte (float): the device's balance, see :data:`DEFAULT_FLOPS_PER_BYTE`.

    Returns:
        float: the factor on the stock estimator's compute terms.

    Example::

        >>> from torchrec_tt.modules.tt_embedding_configs import TTEmbeddingBagConfig
        >>> cfg = TTEmbeddingBagConfig(name="t", num_embeddings=11_000_000, embedding_dim=64, feature_names=["f"],
        ...                            tt_p_shapes=[200, 220, 250], tt_q_shapes=[4, 4, 4], tt_ranks=[32, 32])
        >>> round(tt_compute_scale(cfg, DEFAULT_FLOPS_PER_BYTE["cuda"]), 2)
        2.0
    """
    _, q, r = tt_config_shapes(config)
    return 1.0 + tt_flops_per_row(q, r) / (config.embedding_dim * flops_per_byte)


class TTPerfEstimator(ShardEstimator):
    """Perf of TT-collection shards: the stock estimate of a fused TBE, compute scaled by the TT FLOPs.

    The communication terms are the stock ones (same dists). The compute terms are
    multiplied by :func:`tt_compute_scale`.

    Args:
        topology (Topology): the planner's topology.
        constraints (dict[str, ParameterConstraints], optional): as for the stock estimator.
        flops_per_byte (float, optional): FLOPs the device does in the time it streams one
            byte (default: :data:`DEFAULT_FLOPS_PER_BYTE` of the topology's compute device,
            measured on a 2-core CPU and an H100; calibrate it on yours with
            ``benchmarks/bench_tt_embedding_bag.py``).
    """

    def __init__(
        self,
        topology: Topology,
        constraints: dict[str, ParameterConstraints] | None = None,
        flops_per_byte: float | None = None,
    ) -> None:
        self._inner = EmbeddingPerfEstimator(topology=topology, constraints=constraints)
        if flops_per_byte is None:
            flops_per_byte = DEFAULT_FLOPS_PER_BYTE.get(topology.compute_device, DEFAULT_FLOPS_PER_BYTE["cuda"])
        if flops_per_byte <= 0:
            raise ValueError(f"TTPerfEstimator: flops_per_byte must be > 0, got {flops_per_byte}")
        self._flops_per_byte = flops_per_byte

    def estimate(self, sharding_options: list[ShardingOption], *args: Any, **kwargs: Any) -> None:
        tt = [o for o in sharding_options if _tt_option(o) is not None]
        kernels = [o.compute_kernel for o in tt]
        for o in tt:
            o.compute_kernel = "dense" if o.sharding_type == ShardingType.DATA_PARALLEL.value else "fused"
        try:
            self._inner.estimate(sharding_options, *args, **kwargs)
        finally:
            for o, k in zip(tt, kernels, strict=True):
                o.compute_kernel = k
        for option in tt:
            _, config = _tt_option(option)  # type: ignore[misc]
            scale = tt_compute_scale(config, self._flops_per_byte)
            for shard in option.shards:
                perf = shard.perf
                if perf is None:
                    continue
                shard.perf = Perf(
                    fwd_compute=perf.fwd_compute * scale,
                    fwd_comms=perf.fwd_comms,
                    bwd_compute=perf.bwd_compute * scale,
                    bwd_comms=perf.bwd_comms,
                    input_dist_comms=perf.input_dist_comms,
                    prefetch_compute=perf.prefetch_compute,
                )


def _aligned_cw_block(config: EmbeddingBagConfig, min_dim: int = 32) -> int | None:
    p, q, _ = tt_config_shapes(config)
    q_inner = math.prod(q[1:])
    for m in range(1, q[0] + 1):
        if q[0] % m == 0 and q_inner * m >= min(min_dim, config.embedding_dim):
            return q_inner * m
    return None


def tt_parameter_constraints(
    model: nn.Module,
    topology: Topology,
    constraints: dict[str, ParameterConstraints] | None = None,
    fused_params: dict[str, Any] | None = None,
) -> dict[str, ParameterConstraints]:
    """Constraints that keep the planner to shardings TT tables can take.

    For each table of every ``TTEmbeddingBagCollection`` in ``model``: the TT compute
    kernel; row-wise / table-row-wise only when the row block is whole first-core
    slices for this topology; column-wise shards of whole first-core slices, at most one
    per rank (the sharded module holds one shard of a table per rank); a cached
    table (``use_cache=True``) never data-parallel, nor column-wise when its fused
    optimizer is row-wise Adagrad (the sharded module refuses both). User constraints
    for a table are kept (their sharding types are intersected).

    Args:
        model (nn.Module): the model to plan.
        topology (Topology): the planner's topology.
        constraints (dict[str, ParameterConstraints], optional): user constraints.
        fused_params (dict, optional): the TT sharder's ``fused_params`` (the optimizer of
            cached tables).

    Returns:
        dict[str, ParameterConstraints]: constraints for every table.
    """
    out = dict(constraints or {})
    world, local = topology.world_size, getattr(topology, "local_world_size", topology.world_size)
    for module in model.modules():
        if not isinstance(module, TTEmbeddingBagCollection):
            continue
        for config in module.embedding_bag_configs():
            p, q, _ = tt_config_shapes(config)
            p_inner = math.prod(p[1:])
            allowed = [ShardingType.TABLE_WISE.value, ShardingType.DATA_PARALLEL.value]
            if math.ceil(config.num_embeddings / world) % p_inner == 0:
                allowed.append(ShardingType.ROW_WISE.value)
            if local and world % local == 0 and math.ceil(config.num_embeddings / local) % p_inner == 0:
                allowed.append(ShardingType.TABLE_ROW_WISE.value)
            # no more column shards than ranks (the sharded module holds one shard of a table per rank)
            block = _aligned_cw_block(config, max(32, math.ceil(config.embedding_dim / world)))
            if block is not None and block < config.embedding_dim:
                allowed.append(ShardingType.COLUMN_WISE.value)
            if uses_cache(config):
                allowed.remove(ShardingType.DATA_PARALLEL.value)
                params = list(module.embedding_bags[config.name].parameters())
                if resolve_table_optimizer(config.name, fused_params, params).optimizer == FusedOptimizer.ROWWISE_ADAGRAD:
                    allowed = [st for st in allowed if st != ShardingType.COLUMN_WISE.value]
            user = out.get(config.name)
            if user is not None:
                if user.sharding_types:
                    possible = allowed
                    allowed = [s for s in user.sharding_types if s in possible]
                    if not allowed:
                        raise ValueError(
                            f"TT table '{config.name}': none of the constrained sharding types {user.sharding_types} "
                            f"is possible; this table can take {possible} (row-wise needs row blocks of whole "
                            "first-core slices: see torchrec_tt.modules.align_config_for_row_wise; a cached table is "
                            "never data-parallel)"
                        )
                user.sharding_types = allowed
                user.compute_kernels = [TT_COMPUTE_KERNEL]
                if user.min_partition is None:
                    user.min_partition = block
            else:
                out[config.name] = ParameterConstraints(
                    sharding_types=allowed, compute_kernels=[TT_COMPUTE_KERNEL], min_partition=block
                )
    return out


class _TTEnumerator(EmbeddingEnumerator):
    """``EmbeddingEnumerator`` whose cached search space (kept per module and sharders) can be dropped."""

    def forget_search_space(self) -> None:
        """Enumerate again at the next call (the constraints changed)."""
        self._last_stored_module = None


class _TTShardingPlanner(EmbeddingShardingPlanner):
    """``EmbeddingShardingPlanner`` whose plans never give one rank two column-wise shards of a TT table.

    The constraints cap a TT table's column shards at the world size, but the partitioner may still
    stack two of them on one rank (or a user's ``min_partition`` may ask for more shards than ranks):
    such a table is planned again without column-wise sharding (logged), until the plan has none. A
    table constrained to column-wise sharding alone raises ``ValueError`` instead.
    """

    def __init__(self, *, enumerator: _TTEnumerator, tt_constraints: dict[str, ParameterConstraints], **kwargs: Any) -> None:
        super().__init__(enumerator=enumerator, **kwargs)
        self._tt_enumerator = enumerator
        self._tt_constraints = tt_constraints

    def plan(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> ShardingPlan:
        while True:
            plan = super().plan(module, sharders)
            stacked = sorted(
                (name, ps.ranks)
                for module_plan in plan.plan.values()
                for name, ps in module_plan.items()
                if getattr(ps, "compute_kernel", None) == TT_COMPUTE_KERNEL
                and ps.sharding_type == ShardingType.COLUMN_WISE.value
                and len(set(ps.ranks or [])) < len(ps.ranks or [])
            )
            if not stacked:
                return plan
            for name, ranks in stacked:
                c = self._tt_constraints.setdefault(
                    name, ParameterConstraints(sharding_types=[st.value for st in ShardingType], compute_kernels=[TT_COMPUTE_KERNEL])
                )
                others = [st for st in (c.sharding_types or []) if st != ShardingType.COLUMN_WISE.value]
                if not others:
                    raise ValueError(
                        f"TT table '{name}': the plan put two of its column-wise shards on one rank (ranks {ranks}), "
                        "which the sharded module cannot hold, and column-wise is its only allowed sharding type; "
                        "allow another one, or a min_partition of at least embedding_dim / world_size"
                    )
                logger.warning(
                    "TT table '%s': the plan put two of its column-wise shards on one rank (ranks %s), which the "
                    "sharded module cannot hold; planning it again without column-wise sharding", name, ranks,
                )
                c.sharding_types = others
            self._tt_enumerator.forget_search_space()


def make_tt_planner(
    topology: Topology,
    batch_size: int,
    model: nn.Module | None = None,
    constraints: dict[str, ParameterConstraints] | None = None,
    fused_params: dict[str, Any] | None = None,
    flops_per_byte: float | None = None,
    **planner_kwargs: Any,
) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` that charges TT tables their real bytes and compute.

    Args:
        topology (Topology): world size, device, HBM/DDR capacities.
        batch_size (int): per-rank batch size.
        model (nn.Module, optional): the model; when given, TT alignment constraints are added
            (:func:`tt_parameter_constraints`).
        constraints (dict[str, ParameterConstraints], optional): user constraints.
        fused_params (dict, optional): the TT sharder's ``fused_params`` (optimizer state size).
        flops_per_byte (float, optional): see :class:`TTPerfEstimator`.
        **planner_kwargs: passed to ``EmbeddingShardingPlanner`` (e.g. ``debug``).

    Returns:
        EmbeddingShardingPlanner: call ``.plan(model, [TTEmbeddingBagCollectionSharder(...), *stock])``.

    Example::

        >>> # model: a module holding TTEmbeddingBagCollections (and stock tables)
        >>> planner = make_tt_planner(  # doctest: +SKIP
        ...     Topology(world_size=2, compute_device="cuda"), batch_size=512, model=model)
        >>> plan = planner.plan(  # doctest: +SKIP
        ...     model, [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()])
    """
    if model is not None:
        constraints = tt_parameter_constraints(model, topology, constraints, fused_params)
    constraints = dict(constraints or {})  # one dict for the planner, the enumerator and the estimators: it may tighten it
    estimators = [
        TTPerfEstimator(topology, constraints, flops_per_byte=flops_per_byte),
        TTStorageEstimator(topology, constraints, fused_params=fused_params),
    ]
    enumerator = _TTEnumerator(topology=topology, batch_size=batch_size, constraints=constraints, estimator=estimators)
    return _TTShardingPlanner(
        topology=topology, batch_size=batch_size, enumerator=enumerator, constraints=constraints,
        tt_constraints=constraints, **planner_kwargs,
    )
