"""Model side of the DLRM job: tables (TT or not), DLRM / DLRM-DCN, sharding, optimizers.

The TT path and the uncompressed path share everything but the table configs:
``compression: tt`` turns the chosen tables into :class:`TTEmbeddingBagConfig`
(the others stay plain ``EmbeddingBagConfig``) inside one
:class:`TTEmbeddingBagCollection`, sharded by the TT sharder and planned by the
TT-aware planner; ``compression: none`` builds torchrec's ``EmbeddingBagCollection``
with the same tables, sharded and planned by torchrec (or, on a GPU machine
without FBGEMM's CUDA build, the plain tables inside a ``TTEmbeddingBagCollection``).
Both get the fused embedding optimizer through the sharder's ``fused_params``
(``EmbOptimType``), and DMP wraps the MLPs in DDP.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_tt.modules.tt_embedding_configs import TTEmbeddingBagConfig, align_config_for_row_wise, is_tt_config
from torchrec_tt.modules.tt_embedding_modules import TTEmbeddingBagCollection
from torchrec_tt.training.config import ModelConfig, OptimConfig, TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddingSizeReport",
    "build_model",
    "build_optimizer",
    "build_tables",
    "dense_parameter_count",
    "embedding_size_report",
    "fbgemm_has_cuda_kernels",
    "make_sharders",
    "resolve_embedding_module",
    "select_tt_tables",
    "shard_model",
    "sparse_collection",
]


def _table_name(feature: str) -> str:
    return f"t_{feature}"


def select_tt_tables(feature_names: Sequence[str], sizes: Sequence[int], cfg: ModelConfig) -> list[str]:
    """Features whose tables are TT-compressed.

    Those are the ``tt_num_largest`` largest tables with at least ``tt_min_rows``
    rows, plus ``tt_tables`` and the keys of ``tt_table_shapes``. Names may be given
    as the feature (``cat_2``) or the table (``t_cat_2``).

    Args:
        feature_names (list[str]): one feature per table.
        sizes (list[int]): rows per table.
        cfg (ModelConfig): the model section.

    Returns:
        list[str]: feature names, in input order (empty when ``compression`` is ``none``).

    Example::

        >>> select_tt_tables(["a", "b", "c"], [10, 1000, 500], ModelConfig(tt_num_largest=1, tt_min_rows=0))
        ['b']
    """
    if cfg.compression == "none":
        return []
    by_size = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    chosen = {feature_names[i] for i in by_size[: cfg.tt_num_largest] if sizes[i] >= cfg.tt_min_rows}
    known = set(feature_names)
    for name in [*cfg.tt_tables, *cfg.tt_table_shapes]:
        feature = name[2:] if name.startswith("t_") and name[2:] in known else name
        if feature not in known:
            raise ValueError(f"TT table {name!r} is not a feature/table of this data set: {sorted(known)}")
        chosen.add(feature)
    return [f for f in feature_names if f in chosen]


def build_tables(
    feature_names: Sequence[str], sizes: Sequence[int], cfg: ModelConfig, row_wise_shards: int = 0
) -> list[EmbeddingBagConfig]:
    """Table configs: ``TTEmbeddingBagConfig`` for the selected features, plain otherwise.

    Args:
        feature_names (list[str]): one feature (and table ``t_<feature>``) each.
        sizes (list[int]): rows per table.
        cfg (ModelConfig): dimension, TT selection, ranks, caches and per-table overrides.
        row_wise_shards (int): when > 1, TT tables are padded so that row-wise shards over
            this many ranks are whole first-core slices (``align_config_for_row_wise``).

    Returns:
        list[EmbeddingBagConfig]: in feature order.

    Example::

        >>> tables = build_tables(["a", "b"], [10, 100_000], ModelConfig(tt_ranks=[4, 4]))
        >>> [type(t).__name__ for t in tables], tables[1].tt_ranks
        (['EmbeddingBagConfig', 'TTEmbeddingBagConfig'], [4, 4])
    """
    tt = set(select_tt_tables(feature_names, sizes, cfg))
    tables: list[EmbeddingBagConfig] = []
    for feature, n in zip(feature_names, sizes, strict=True):
        common = {"name": _table_name(feature), "num_embeddings": int(n), "embedding_dim": cfg.embedding_dim,
                  "feature_names": [feature]}
        if feature in tt:
            shapes = dict(cfg.tt_table_shapes.get(feature) or cfg.tt_table_shapes.get(_table_name(feature)) or {})
            shapes.setdefault("tt_ranks", list(cfg.tt_ranks))
            if cfg.tt_cache_fraction > 0 and shapes.setdefault("use_cache", True):
                shapes.setdefault("cache_size", max(1, math.ceil(cfg.tt_cache_fraction * n)))
                shapes.setdefault("cache_populate_interval", cfg.tt_cache_populate_interval)
                shapes.setdefault("cache_eviction_policy", cfg.tt_cache_eviction_policy)
                shapes.setdefault("cache_count_decay", cfg.tt_cache_count_decay)
            if "tt_p_shapes" not in shapes and "tt_q_shapes" not in shapes and len(shapes["tt_ranks"]) != cfg.tt_num_cores - 1:
                raise ValueError(f"table {feature}: tt_ranks {shapes['tt_ranks']} do not match tt_num_cores={cfg.tt_num_cores}")
            table = TTEmbeddingBagConfig(**common, **shapes)
            tables.append(align_config_for_row_wise(table, row_wise_shards) if row_wise_shards > 1 else table)
        else:
            tables.append(EmbeddingBagConfig(**common))
    return tables


@dataclass
class EmbeddingSizeReport:
    """Parameter counts of the embedding tables (uncompressed vs as configured).

    Attributes:
        uncompressed_params (int): ``sum(N * D)`` over all tables.
        stored_params (int): TT cores of TT tables plus ``N * D`` of plain tables.
        tt_tables (int): number of TT tables.
        tt_uncompressed_params (int): ``sum(N * D)`` over the TT tables only.
        tt_stored_params (int): scalars in their cores.
        per_table (list[dict]): name, rows, stored params, TT shapes.
    """

    uncompressed_params: int
    stored_params: int
    tt_tables: int
    tt_uncompressed_params: int
    tt_stored_params: int
    per_table: list[dict[str, Any]]

    @property
    def compression_ratio(self) -> float:
        """All embeddings: uncompressed over stored."""
        return self.uncompressed_params / max(self.stored_params, 1)

    @property
    def tt_compression_ratio(self) -> float:
        """TT tables only: uncompressed over stored (1.0 when there are none)."""
        return self.tt_uncompressed_params / self.tt_stored_params if self.tt_stored_params else 1.0

    def to_dict(self, bytes_per_param: int = 4) -> dict[str, Any]:
        """JSON-friendly summary (sizes in MB assume ``bytes_per_param``)."""
        mb = bytes_per_param / 2**20
        return {
            "embedding_params_uncompressed": self.uncompressed_params,
            "embedding_params_stored": self.stored_params,
            "embedding_mb_uncompressed": round(self.uncompressed_params * mb, 3),
            "embedding_mb_stored": round(self.stored_params * mb, 3),
            "compression_ratio": round(self.compression_ratio, 2),
            "tt_tables": self.tt_tables,
            "tt_tables_compression_ratio": round(self.tt_compression_ratio, 2),
        }


def embedding_size_report(tables: Sequence[EmbeddingBagConfig]) -> EmbeddingSizeReport:
    """Count parameters of ``tables`` (see :class:`EmbeddingSizeReport`).

    Example::

        >>> r = embedding_size_report(build_tables(["a"], [1_000_000], ModelConfig(tt_ranks=[8, 8], tt_min_rows=0)))
        >>> r.uncompressed_params, r.stored_params
        (16000000, 17600)
    """
    unc = stored = tt_unc = tt_stored = n_tt = 0
    rows = []
    for t in tables:
        full = t.num_embeddings * t.embedding_dim
        unc += full
        if is_tt_config(t):
            k = t.num_tt_parameters()
            n_tt += 1
            tt_unc += full
            tt_stored += k
            rows.append({"table": t.name, "rows": t.num_embeddings, "params": k, "tt_p_shapes": t.tt_p_shapes,
                         "tt_q_shapes": t.tt_q_shapes, "tt_ranks": t.tt_ranks})
        else:
            k = full
            rows.append({"table": t.name, "rows": t.num_embeddings, "params": k})
        stored += k
    return EmbeddingSizeReport(unc, stored, n_tt, tt_unc, tt_stored, rows)


def build_model(
    tables: Sequence[EmbeddingBagConfig],
    num_dense: int,
    cfg: ModelConfig,
    dense_device: torch.device,
) -> DLRMTrain:
    """DLRM or DLRM-DCN over the tables; the embedding collection is built on ``meta``.

    The collection is a :class:`TTEmbeddingBagCollection` or torchrec's
    ``EmbeddingBagCollection`` as :func:`resolve_embedding_module` decides. DMP
    materialises the sharded tables on the right devices.

    Args:
        tables (list[EmbeddingBagConfig]): from :func:`build_tables`.
        num_dense (int): dense input features.
        cfg (ModelConfig): architecture.
        dense_device (torch.device): where the MLPs are created.

    Returns:
        DLRMTrain: ``forward(batch) -> (loss, (loss, logits, labels))``.
    """
    meta = torch.device("meta")
    if resolve_embedding_module(tables, cfg, dense_device) == "tt":
        ebc: nn.Module = TTEmbeddingBagCollection(list(tables), device=meta)
    else:
        ebc = EmbeddingBagCollection(tables=list(tables), device=meta)
    common = {
        "embedding_bag_collection": ebc,
        "dense_in_features": num_dense,
        "dense_arch_layer_sizes": list(cfg.dense_arch_layer_sizes),
        "over_arch_layer_sizes": list(cfg.over_arch_layer_sizes),
        "dense_device": dense_device,
    }
    if cfg.model_type == "dlrm_dcn":
        dlrm: DLRM = DLRM_DCN(**common, dcn_num_layers=cfg.dcn_num_layers, dcn_low_rank_dim=cfg.dcn_low_rank_dim)
    else:
        dlrm = DLRM(**common)
    return DLRMTrain(dlrm)


def fbgemm_has_cuda_kernels() -> bool:
    """Whether FBGEMM's CUDA build is installed (not just ``fbgemm-gpu-cpu``).

    Checked on ``fbgemm::permute_2D_sparse_data``; call it before
    ``register_fbgemm_cuda_fallbacks()``, which adds a CUDA kernel for that op.
    """
    import fbgemm_gpu  # noqa: F401  (defines the fbgemm ops)

    return torch._C._dispatch_has_kernel_for_dispatch_key("fbgemm::permute_2D_sparse_data", "CUDA")


def resolve_embedding_module(tables: Sequence[EmbeddingBagConfig], cfg: ModelConfig, device: torch.device) -> str:
    """``"tt"`` (TTEmbeddingBagCollection) or ``"torchrec"`` (EmbeddingBagCollection) for these tables.

    Example::

        >>> plain = [EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=16, feature_names=["f"])]
        >>> resolve_embedding_module(plain, ModelConfig(), torch.device("cpu"))
        'torchrec'
    """
    if any(is_tt_config(t) for t in tables) or cfg.embedding_module == "tt":
        return "tt"
    if cfg.embedding_module == "torchrec" or device.type != "cuda":
        return "torchrec"
    return "torchrec" if fbgemm_has_cuda_kernels() else "tt"


def sparse_collection(model: DLRMTrain) -> nn.Module:
    """The (unsharded) embedding collection inside ``model``."""
    return model.model.sparse_arch.embedding_bag_collection


def _fused_params(cfg: OptimConfig) -> dict[str, Any]:
    return {
        "optimizer": EmbOptimType(cfg.embedding_optimizer),
        "learning_rate": cfg.embedding_lr,
        "eps": cfg.embedding_eps,
    }


def _tt_distributed() -> Any:
    """The ``torchrec_tt.distributed`` package (the TT sharder and planner helper)."""
    import torchrec_tt.distributed as tt_dist

    return tt_dist


def make_sharders(
    model: DLRMTrain, cfg: OptimConfig, qcomm_codecs_registry: dict[str, Any] | None = None
) -> list[ModuleSharder[nn.Module]]:
    """Sharders for the model's collection, with the fused embedding optimizer.

    Args:
        model (DLRMTrain): the unsharded model.
        cfg (OptimConfig): embedding optimizer settings (``fused_params``).
        qcomm_codecs_registry (dict, optional): quantized comm codecs of the output dists
            (``--comm_codec``).

    Returns:
        list[ModuleSharder]: the TT sharder for a TT collection, torchrec's otherwise.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    fused = _fused_params(cfg)
    if isinstance(sparse_collection(model), TTEmbeddingBagCollection):
        return [
            _tt_distributed().TTEmbeddingBagCollectionSharder(
                fused_params=fused, qcomm_codecs_registry=qcomm_codecs_registry
            )
        ]
    return [EmbeddingBagCollectionSharder(fused_params=fused, qcomm_codecs_registry=qcomm_codecs_registry)]


def _constraints(
    tables: Sequence[EmbeddingBagConfig], sharding: str, stock_on_cpu: bool = False
) -> dict[str, ParameterConstraints] | None:
    if sharding != "planner":
        return {t.name: ParameterConstraints(sharding_types=[sharding]) for t in tables}
    if not stock_on_cpu:
        return None
    # torchrec's data-parallel tables run fbgemm's dense TBE, whose CPU build registers no autograd
    # kernel for CPU: their gradients would be dropped silently (a warning, no error). Keep them
    # model-parallel on CPU, where the fused TBE trains them.
    from torchrec.distributed.types import ShardingType

    types = [st.value for st in ShardingType if st != ShardingType.DATA_PARALLEL]
    return {t.name: ParameterConstraints(sharding_types=types) for t in tables}


def shard_model(
    model: DLRMTrain,
    env: ShardingEnv,
    device: torch.device,
    sharders: list[ModuleSharder[nn.Module]],
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    batch_size: int,
    local_world_size: int,
) -> DistributedModelParallel:
    """Plan and shard: DMP over the model (tables sharded, MLPs in DDP).

    A TT collection is planned by the TT-aware planner
    (:func:`torchrec_tt.distributed.planner.make_tt_planner`: real TT bytes and FLOPs,
    shardings aligned with the cores), torchrec's collection by torchrec's
    ``EmbeddingShardingPlanner``. ``train_cfg.sharding`` other than ``planner``
    constrains every table to that sharding type. Rank 0 plans, the plan is broadcast.

    Args:
        model (DLRMTrain): the unsharded model (collection on ``meta``).
        env (ShardingEnv): process group.
        device (torch.device): this rank's device.
        sharders (list[ModuleSharder]): from :func:`make_sharders`.
        train_cfg (TrainConfig): sharding choice.
        optim_cfg (OptimConfig): fused optimizer (its state counts in the planner's memory).
        batch_size (int): per-rank batch (planner cost model).
        local_world_size (int): ranks per host.

    Returns:
        DistributedModelParallel: the sharded model.
    """
    collection = sparse_collection(model)
    stock_on_cpu = device.type == "cpu" and not isinstance(collection, TTEmbeddingBagCollection)
    constraints = _constraints(collection.embedding_bag_configs(), train_cfg.sharding, stock_on_cpu)
    topology = _topology(env.world_size, device.type, local_world_size)
    if isinstance(collection, TTEmbeddingBagCollection):
        from torchrec_tt.distributed.planner import make_tt_planner

        planner = make_tt_planner(
            topology, batch_size, model=model, constraints=constraints, fused_params=_fused_params(optim_cfg)
        )
    else:
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    plan: ShardingPlan = planner.collective_plan(model, sharders, env.process_group)
    dmp = DistributedModelParallel(module=model, env=env, device=device, plan=plan, sharders=sharders)
    if env.rank == 0:
        for module_fqn, module_plan in plan.plan.items():
            for table, ps in module_plan.items():  # type: ignore[union-attr]
                logger.info("plan %s.%s: %s %s ranks=%s", module_fqn, table, ps.sharding_type, ps.compute_kernel, ps.ranks)
    return dmp


def _topology(world_size: int, device_type: str, local_world_size: int) -> Topology:
    """``Topology`` without torchrec 1.7+'s "use TopologyFactory" warning (its API differs across 1.6-1.8)."""
    planner_logger = logging.getLogger("torchrec.distributed.planner.types")
    level = planner_logger.level
    planner_logger.setLevel(logging.ERROR)
    try:
        return Topology(world_size=world_size, compute_device=device_type, local_world_size=local_world_size)
    finally:
        planner_logger.setLevel(level)


def build_optimizer(dmp: DistributedModelParallel, cfg: OptimConfig) -> CombinedOptimizer:
    """The fused embedding optimizer (from the sharders) plus a ``torch.optim`` one for the MLPs.

    Args:
        dmp (DistributedModelParallel): the sharded model.
        cfg (OptimConfig): dense optimizer choice.

    Returns:
        CombinedOptimizer: ``step()``/``zero_grad()``/``state_dict()`` over both.
    """
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if cfg.dense_optimizer == "adagrad":
        def factory(params: Any) -> torch.optim.Optimizer:
            return torch.optim.Adagrad(params, lr=cfg.dense_lr, eps=cfg.dense_eps)
    elif cfg.dense_optimizer == "adam":
        def factory(params: Any) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=cfg.dense_lr, eps=cfg.dense_eps)
    else:
        def factory(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=cfg.dense_lr)
    dense = KeyedOptimizerWrapper(dense_params, factory)
    optimizers: list[KeyedOptimizer | tuple[str, KeyedOptimizer]] = [("fused", dmp.fused_optimizer), ("dense", dense)]
    n_dense = sum(p.numel() for p in dense_params.values())
    logger.info("dense optimizer %s over %d tensors (%d params)", cfg.dense_optimizer, len(dense_params), n_dense)
    return CombinedOptimizer(optimizers)


def dense_parameter_count(model: nn.Module) -> int:
    """Parameters outside the embedding collection (the MLPs, cross net)."""
    return sum(
        p.numel() for n, p in model.named_parameters() if "embedding_bag_collection" not in n and p.device.type != "meta"
    )
