"""Configuration of the DLRM training job: dataclasses, YAML overrides, CLI overrides.

The dataclasses below are the single source of truth for every option and its
default (the pattern of torchrec's ``benchmark_base.cmd_conf``). A YAML file
overrides them, and command-line flags override the YAML file::

    dataclass defaults  <  --yaml_config FILE  <  --flag value

A YAML file may be flat (``batch_size: 512``) or grouped by section
(``data: {batch_size: 512}``); section names are ``data``, ``model``, ``optim``
and ``train`` (the class names ``DataConfig`` ... are accepted too). Every field
name is unique across sections, so each one is also a flat CLI flag
(``--batch_size 512``). Unknown keys are errors, never silently ignored.

CLI value syntax: lists as ``--tt_ranks 16 16`` or ``--tt_ranks 16,16``;
booleans as ``true``/``false``/``1``/``0``/``yes``/``no``; dicts as YAML/JSON
(``--tt_table_shapes '{cat_2: {tt_ranks: [8, 8]}}'``); ``none`` for an optional
value.

Example::

    >>> cfg = parse_config(["--batch_size", "64", "--tt_ranks", "8,8"])
    >>> cfg.data.batch_size, cfg.model.tt_ranks
    (64, [8, 8])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

__all__ = [
    "CRITEO_KAGGLE_NUM_EMBEDDINGS",
    "CRITEO_TERABYTE_NUM_EMBEDDINGS",
    "MLPERF_DCNV2_MULTI_HOT_SIZES",
    "MLPERF_DCNV2_NUM_EMBEDDINGS",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "config_from_dict",
    "load_yaml",
    "parse_config",
]

# Cardinalities of the 26 categorical features, in the order cat_0 .. cat_25.
#: Criteo Kaggle (Display Advertising Challenge), as in facebookresearch/dlrm and TT-Rec.
CRITEO_KAGGLE_NUM_EMBEDDINGS: list[int] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
#: Criteo 1TB click logs, all 24 days, no hashing (torchrec's DLRM example).
CRITEO_TERABYTE_NUM_EMBEDDINGS: list[int] = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]  # fmt: skip
#: MLPerf Training DLRM-DCNv2 (Criteo 1TB, tables capped at 40M rows).
MLPERF_DCNV2_NUM_EMBEDDINGS: list[int] = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # fmt: skip
#: MLPerf DLRM-DCNv2 synthetic multi-hot sizes per feature.
MLPERF_DCNV2_MULTI_HOT_SIZES: list[int] = [
    3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1,
]  # fmt: skip

#: Default (small) cardinalities: Criteo Kaggle's, capped at 200k rows per table.
_SMALL_NUM_EMBEDDINGS: list[int] = [min(n, 200_000) for n in CRITEO_KAGGLE_NUM_EMBEDDINGS]

DATASETS = ("synthetic", "criteo_npy", "criteo_multihot", "criteo_tsv", "movielens100k")
MODELS = ("dlrm", "dlrm_dcn")
COMPRESSIONS = ("tt", "none")
# Cache settings a table may override in ``tt_table_shapes`` (TTEmbeddingBagConfig fields).
TABLE_CACHE_KEYS = (
    "use_cache", "cache_size", "hashtbl_size", "cache_eviction_policy", "cache_populate_interval", "cache_count_decay"
)
DENSE_OPTIMIZERS = ("adagrad", "adam", "sgd")
EMBEDDING_OPTIMIZERS = ("exact_row_wise_adagrad", "exact_adagrad", "exact_sgd", "sgd", "row_wise_adagrad")
SHARDINGS = ("planner", "table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise")
DEVICES = ("auto", "cpu", "cuda")
MATMUL_PRECISIONS = ("highest", "high", "medium")
#: ``--comm_codec`` values (same as ``torchrec_tt.distributed.comm_codec.COMM_CODECS``).
COMM_CODECS = ("none", "fp16", "bf16", "eb4", "eb8", "eb16", "eb_adaptive")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass
class DataConfig:
    """Where the batches come from.

    Args:
        dataset (str): ``synthetic`` (default: power-law ids, planted signal, see
            :class:`torchrec_tt.training.data.SyntheticCriteoDataset`), ``criteo_npy``
            (torchrec's preprocessed ``day_{i}_{dense,sparse,labels}.npy``), ``criteo_multihot``
            (MLPerf DLRM-DCNv2's ``day_{i}_{dense,labels}.npy`` and ``day_{i}_sparse_multi_hot.npz``,
            memory-mapped: :class:`torchrec_tt.training.criteo_multihot.CriteoMultiHotDataset`),
            ``criteo_tsv`` (raw Kaggle ``train.txt`` / Terabyte ``day_*`` TSV files,
            categorical values hashed into the table sizes) or ``movielens100k``.
        batch_size (int): training batch size *per rank*.
        eval_batch_size (int, optional): evaluation batch size per rank (default: ``batch_size``).
        num_embeddings_per_feature (list[int]): rows of each categorical feature's table
            (synthetic and Criteo; MovieLens derives its own).
        num_dense_features (int): dense (continuous) features (Criteo: 13).
        multi_hot_sizes (list[int]): ids per sample of each feature (synthetic; checked
            against the files for ``criteo_multihot``); empty = one id per feature (synthetic)
            or what the files hold.
        zipf_alpha (float): exponent of the power law of synthetic ids (> 1: heavier head).
        signal_scale (float): scale of the planted logit of synthetic labels (0 = labels are
            pure noise, AUC 0.5).
        eval_samples (int): synthetic validation/test samples (each, over all ranks).
        synthetic_pool_batches (int): when > 0, each rank pre-generates this many training
            batches once and cycles through them (throughput benchmarks: data costs nothing);
            0 = a fresh sample every step (accuracy runs).
        data_seed (int): seed of the synthetic generator / MovieLens split.
        criteo_path (str): directory of the Criteo files (``criteo_npy``, ``criteo_multihot``, ``criteo_tsv``).
        criteo_days (int): days in ``criteo_path`` (Kaggle preprocessed by torchrec: 7,
            Terabyte: 24); the last day is split into validation and test halves.
        criteo_tsv_files (list[str]): TSV files relative to ``criteo_path`` (default:
            ``train.txt`` if present, else ``day_0 .. day_{criteo_days-1}``); the last
            ``eval_fraction`` of the rows is held out.
        eval_fraction (float): held-out fraction for ``criteo_tsv`` (half validation, half test).
        movielens_path (str): ``ml-100k.*`` files: a directory, a recbole wheel, or empty to
            fetch the recbole 1.2.1 wheel from PyPI into ``cache_dir``.
        cache_dir (str): download cache (default ``~/.cache/torchrec_tt``).
        num_workers (int): DataLoader worker processes per rank (0 = in the training process).
        shuffle (bool): shuffle the training rows of in-memory datasets every epoch.
    """

    dataset: str = "synthetic"
    batch_size: int = 512
    eval_batch_size: int | None = None
    num_embeddings_per_feature: list[int] = field(default_factory=lambda: list(_SMALL_NUM_EMBEDDINGS))
    num_dense_features: int = 13
    multi_hot_sizes: list[int] = field(default_factory=list)
    zipf_alpha: float = 1.1
    signal_scale: float = 1.0
    eval_samples: int = 65536
    synthetic_pool_batches: int = 0
    data_seed: int = 0
    criteo_path: str = ""
    criteo_days: int = 24
    criteo_tsv_files: list[str] = field(default_factory=list)
    eval_fraction: float = 0.1
    movielens_path: str = ""
    cache_dir: str = ""
    num_workers: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        if self.batch_size < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size}, {self.eval_batch_size}")
        if self.dataset != "movielens100k":
            if not self.num_embeddings_per_feature or min(self.num_embeddings_per_feature) < 1:
                raise ValueError(f"num_embeddings_per_feature must be positive, got {self.num_embeddings_per_feature}")
            if self.multi_hot_sizes and len(self.multi_hot_sizes) != len(self.num_embeddings_per_feature):
                raise ValueError(
                    f"multi_hot_sizes has {len(self.multi_hot_sizes)} entries, num_embeddings_per_feature "
                    f"{len(self.num_embeddings_per_feature)}"
                )
        if self.multi_hot_sizes and min(self.multi_hot_sizes) < 1:
            raise ValueError(f"multi_hot_sizes must be >= 1, got {self.multi_hot_sizes}")
        if self.zipf_alpha <= 0:
            raise ValueError(f"zipf_alpha must be > 0, got {self.zipf_alpha}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.dataset in ("criteo_npy", "criteo_multihot", "criteo_tsv") and not self.criteo_path:
            raise ValueError(f"dataset={self.dataset} needs --criteo_path")


@dataclass
class ModelConfig:
    """The DLRM model and which of its tables are TT-compressed.

    Args:
        model_type (str): ``dlrm`` (dot interaction) or ``dlrm_dcn`` (DCNv2 low-rank cross net).
        embedding_dim (int): dimension of every table (DLRM needs one dimension).
        dense_arch_layer_sizes (list[int]): bottom MLP; the last size must be ``embedding_dim``.
        over_arch_layer_sizes (list[int]): top MLP; the last size must be 1.
        dcn_num_layers (int): cross layers (``dlrm_dcn``).
        dcn_low_rank_dim (int): low rank of each cross layer (``dlrm_dcn``).
        compression (str): ``tt`` (compress the tables chosen below) or ``none`` (the same
            model with every table uncompressed: the accuracy baseline).
        embedding_module (str): collection holding uncompressed-only models: ``torchrec``
            (``EmbeddingBagCollection``, FBGEMM TBE kernels), ``tt`` (``TTEmbeddingBagCollection``
            with plain tables) or ``auto`` (``torchrec``, except on CUDA without FBGEMM's CUDA
            build, where only the TT collection runs). Models with TT tables always use ``tt``.
        tt_num_largest (int): compress the N largest tables ...
        tt_min_rows (int): ... that have at least this many rows.
        tt_tables (list[str]): also compress these tables (by name, e.g. ``cat_2``).
        tt_ranks (list[int]): the ``d - 1`` inner TT ranks of every TT table.
        tt_num_cores (int): cores per TT table when shapes are derived.
        tt_table_shapes (dict): per-table overrides of the TT shapes and the cache settings
            below, e.g. ``{cat_2: {tt_p_shapes: [200, 220, 250], tt_q_shapes: [2, 2, 4],
            tt_ranks: [32, 32], cache_size: 4096}}`` (keys: ``tt_p_shapes``, ``tt_q_shapes``,
            ``tt_ranks``, ``use_cache``, ``cache_size``, ``hashtbl_size``,
            ``cache_eviction_policy``, ``cache_populate_interval``, ``cache_count_decay``).
        tt_cache_fraction (float): when > 0, every TT table gets an LFU cache of its hot rows
            (``TTEmbeddingBagConfig(use_cache=True)``) of ``ceil(fraction * rows)`` rows per
            shard; needs a fused embedding optimizer and no data-parallel TT tables.
        tt_cache_populate_interval (int): repopulate the caches every this many training
            lookups (``0``: never, the caches stay empty).
        tt_cache_eviction_policy (str): ``writeback`` (evicted rows are fitted back into the
            cores) or ``discard`` (TT-Rec's behaviour).
        tt_cache_count_decay (float): in ``[0, 1]``: the caches' access counts are multiplied
            by it after every populate (``1``: pure LFU; below 1 the caches follow ids whose
            popularity changes).
    """

    model_type: str = "dlrm"
    embedding_dim: int = 16
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 64
    compression: str = "tt"
    embedding_module: str = "auto"
    tt_num_largest: int = 7
    tt_min_rows: int = 10_000
    tt_tables: list[str] = field(default_factory=list)
    tt_ranks: list[int] = field(default_factory=lambda: [16, 16])
    tt_num_cores: int = 3
    tt_table_shapes: dict[str, Any] = field(default_factory=dict)
    tt_cache_fraction: float = 0.0
    tt_cache_populate_interval: int = 100
    tt_cache_eviction_policy: str = "writeback"
    tt_cache_count_decay: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("model_type", self.model_type, MODELS)
        _check_choice("tt_cache_eviction_policy", self.tt_cache_eviction_policy, ("writeback", "discard"))
        if not 0.0 <= self.tt_cache_fraction <= 1.0:
            raise ValueError(f"tt_cache_fraction must be in [0, 1], got {self.tt_cache_fraction}")
        if not 0.0 <= self.tt_cache_count_decay <= 1.0:
            raise ValueError(f"tt_cache_count_decay must be in [0, 1], got {self.tt_cache_count_decay}")
        if self.tt_cache_populate_interval < 0:
            raise ValueError(f"tt_cache_populate_interval must be >= 0, got {self.tt_cache_populate_interval}")
        _check_choice("compression", self.compression, COMPRESSIONS)
        _check_choice("embedding_module", self.embedding_module, ("auto", "torchrec", "tt"))
        if not self.dense_arch_layer_sizes or self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                f"dense_arch_layer_sizes {self.dense_arch_layer_sizes} must end with embedding_dim={self.embedding_dim}"
            )
        if not self.over_arch_layer_sizes or self.over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"over_arch_layer_sizes {self.over_arch_layer_sizes} must end with 1")
        if len(self.tt_ranks) != self.tt_num_cores - 1 or min(self.tt_ranks, default=1) < 1:
            raise ValueError(f"tt_ranks {self.tt_ranks} must be {self.tt_num_cores - 1} positive ints (tt_num_cores - 1)")
        allowed = {"tt_p_shapes", "tt_q_shapes", "tt_ranks", *TABLE_CACHE_KEYS}
        for name, shapes in self.tt_table_shapes.items():
            if not isinstance(shapes, dict) or not set(shapes) <= allowed:
                raise ValueError(f"tt_table_shapes[{name!r}] must be a dict with keys among {sorted(allowed)}, got {shapes!r}")


@dataclass
class OptimConfig:
    """Optimizers: fused (in backward) for the embeddings, ``torch.optim`` for the dense part.

    Args:
        embedding_optimizer (str): an ``EmbOptimType`` value applied by the sharder's fused
            optimizer (``exact_row_wise_adagrad``, ``exact_adagrad``, ``exact_sgd``...).
        embedding_lr (float): its learning rate.
        embedding_eps (float): its epsilon (Adagrad).
        dense_optimizer (str): ``adagrad``, ``adam`` or ``sgd`` for the MLPs (DDP).
        dense_lr (float): its learning rate.
        dense_eps (float): its epsilon (Adagrad/Adam).
    """

    embedding_optimizer: str = "exact_row_wise_adagrad"
    embedding_lr: float = 0.05
    embedding_eps: float = 1e-8
    dense_optimizer: str = "adagrad"
    dense_lr: float = 0.05
    dense_eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_choice("embedding_optimizer", self.embedding_optimizer, EMBEDDING_OPTIMIZERS)
        _check_choice("dense_optimizer", self.dense_optimizer, DENSE_OPTIMIZERS)
        if self.embedding_lr <= 0 or self.dense_lr <= 0:
            raise ValueError(f"learning rates must be > 0, got {self.embedding_lr}, {self.dense_lr}")


@dataclass
class TrainConfig:
    """The loop: length, evaluation, logging, checkpoints, processes.

    Args:
        train_steps (int): optimizer steps to run (0: ``epochs`` passes over a finite
            dataset; required for the infinite synthetic stream).
        epochs (int): passes over finite training data when ``train_steps`` is 0.
        eval_every (int): validate every N steps (0: only at the end).
        eval_batches (int): cap on validation/test batches per rank (0: the whole split).
        val_at_end (bool): evaluate the validation split after training.
        test_at_end (bool): also evaluate the test split after training.
        test_with_val (bool): evaluate the test split at every validation, and report the
            test AUC at the step of the best validation AUC (model selection on validation,
            i.e. early stopping without stopping).
        log_every (int): write a training metrics row every N steps.
        out_dir (str): metrics (``metrics.csv``, ``metrics.jsonl``), ``summary.json``,
            ``config.yaml`` and (by default) checkpoints go here.
        checkpoint_every (int): save a DCP checkpoint every N steps (0: never; the final
            state is saved when ``checkpoint_at_end``).
        checkpoint_at_end (bool): save a checkpoint after the last step.
        checkpoint_dir (str): default ``<out_dir>/checkpoints``.
        keep_checkpoints (int): newest checkpoints kept on disk.
        resume (bool): continue from the newest checkpoint in ``checkpoint_dir`` if any.
        seed (int): model initialisation seed (same on every rank).
        device (str): ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        float32_matmul_precision (str): ``torch.set_float32_matmul_precision`` on every rank:
            ``highest`` (full fp32), ``high`` / ``medium`` (TF32 tensor cores in the dense
            layers' matmuls, and one-pass TF32 products in the TT tables' CUDA backward).
        nproc (int): start this many local worker processes (when not already launched by
            ``torchrun``); 0 or 1 = run in this process.
        sharding (str): ``planner`` (TT-aware planner) or one sharding type for every table.
        comm_codec (str): codec of the pooled-embedding all-to-all (forward values and backward
            gradients): ``none`` (FP32), ``fp16`` / ``bf16`` (TorchRec's ``QCommsConfig``, every
            comm op), ``eb4`` / ``eb8`` / ``eb16`` (error-bounded fixed-rate codec, see
            :mod:`torchrec_tt.distributed.comm_codec`; reduce-scatter in FP16) or
            ``eb_adaptive`` (error bound adapted per table and per iteration).
        comm_codec_options (dict): overrides for the error-bounded codecs, e.g.
            ``{block_size: 16, forward: {mode: abs, schedule: 0.002}}`` (see
            ``make_comm_codecs_registry``).
        num_threads (int): intra-op threads per rank on CPU (0: cores / local ranks).
        progress_bar (bool): tqdm bar on rank 0.
        simulate_failure_at_step (int): testing aid: rank 0 SIGKILLs itself after this step
            (a hard crash, for the resume test); 0 = off.
    """

    train_steps: int = 200
    epochs: int = 1
    eval_every: int = 0
    eval_batches: int = 0
    val_at_end: bool = True
    test_at_end: bool = True
    test_with_val: bool = False
    log_every: int = 20
    out_dir: str = "runs/dlrm"
    checkpoint_every: int = 0
    checkpoint_at_end: bool = False
    checkpoint_dir: str = ""
    keep_checkpoints: int = 2
    resume: bool = True
    seed: int = 0
    device: str = "auto"
    float32_matmul_precision: str = "highest"
    nproc: int = 0
    sharding: str = "planner"
    comm_codec: str = "none"
    comm_codec_options: dict[str, Any] = field(default_factory=dict)
    num_threads: int = 0
    progress_bar: bool = True
    simulate_failure_at_step: int = 0

    def __post_init__(self) -> None:
        _check_choice("device", self.device, DEVICES)
        _check_choice("float32_matmul_precision", self.float32_matmul_precision, MATMUL_PRECISIONS)
        _check_choice("sharding", self.sharding, SHARDINGS)
        _check_choice("comm_codec", self.comm_codec, COMM_CODECS)
        for name in ("train_steps", "epochs", "eval_every", "eval_batches", "checkpoint_every", "nproc", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"log_every and keep_checkpoints must be >= 1, got {self.log_every}, {self.keep_checkpoints}")
        if self.train_steps == 0 and self.epochs < 1:
            raise ValueError("train_steps=0 needs epochs >= 1")

    @property
    def resolved_checkpoint_dir(self) -> Path:
        """``checkpoint_dir``, or ``<out_dir>/checkpoints`` when empty."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.out_dir) / "checkpoints"


_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass
class ExperimentConfig:
    """All sections of a training job.

    Example::

        >>> cfg = ExperimentConfig()
        >>> cfg.model.compression, cfg.data.dataset
        ('tt', 'synthetic')
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested ``{section: {field: value}}`` (YAML-serialisable)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def __post_init__(self) -> None:
        if self.data.dataset == "synthetic" and self.train.train_steps == 0:
            raise ValueError("the synthetic stream is infinite: set train_steps > 0")


def _field_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """``field name -> (section, Field, resolved type)``; asserts names are unique."""
    index: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in index or f.name in _SECTIONS or f.name in {c.__name__ for c in _SECTIONS.values()}:
                raise AssertionError(f"config field {f.name!r} of {section} clashes with another field or a section")
            index[f.name] = (section, f, hints[f.name])
    return index


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, with a clear error."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"config field {name!r} cannot be None")
    origin = typing.get_origin(tp)
    try:
        if origin is list:
            (elem,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            elif not isinstance(value, list | tuple):
                value = [value]
            items: list[Any] = []
            for v in value:  # argparse nargs gives ["16,16"] or ["16", "16"]
                if isinstance(v, str) and elem is not str:
                    items.extend(x for x in v.replace(",", " ").split() if x)
                elif isinstance(v, str):
                    items.extend(x for x in v.split(",") if x)
                else:
                    items.append(v)
            return [_coerce(name, v, elem) for v in items]
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise TypeError(f"expected a mapping, got {value!r}")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError(f"expected a boolean, got {value!r}")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(f"expected an int, got {value!r}")
            if isinstance(value, str):
                value = value.replace("_", "")
                return int(float(value)) if "e" in value.lower() else int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an int, got {value!r}")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp is Any:
            return value
    except (TypeError, ValueError) as e:
        raise ValueError(f"config field {name!r}: {e}") from None
    raise TypeError(f"config field {name!r}: unsupported type {tp!r}")


def _flatten(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept flat keys and ``{section: {...}}`` groups; reject unknown keys."""
    index = _field_index()
    aliases = {name: name for name in _SECTIONS}
    aliases.update({cls.__name__: name for name, cls in _SECTIONS.items()})
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in aliases:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: section {key!r} must be a mapping, got {value!r}")
            for sub_key, sub_value in value.items():
                if sub_key not in index or index[sub_key][0] != aliases[key]:
                    raise ValueError(f"{source}: unknown key {sub_key!r} in section {key!r}")
                flat[sub_key] = sub_value
        elif key in index:
            flat[key] = value
        else:
            raise ValueError(f"{source}: unknown config key {key!r}")
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a flat ``{field: value}`` dict (unknown keys raise).

    Args:
        path (str or Path): the file.

    Returns:
        dict: the overrides it contains.
    """
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return _flatten(raw, str(path))


def config_from_dict(overrides: dict[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from dataclass defaults plus (flat or nested) overrides.

    Args:
        overrides (dict): ``{field: value}`` or ``{section: {field: value}}``.

    Returns:
        ExperimentConfig: validated configuration.

    Example::

        >>> config_from_dict({"model": {"compression": "none"}, "batch_size": 8}).data.batch_size
        8
    """
    flat = _flatten(overrides, "overrides")
    index = _field_index()
    per_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in flat.items():
        section, _, tp = index[key]
        per_section[section][key] = _coerce(key, value, tp)
    return ExperimentConfig(**{name: cls(**per_section[name]) for name, cls in _SECTIONS.items()})


def _build_parser(yaml_defaults: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train DLRM / DLRM-DCN with TT-compressed embedding tables (torchrec_tt). "
        "Precedence: dataclass defaults < --yaml_config < flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--yaml_config", "--config", dest="yaml_config", default=None, help="YAML config file")
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = yaml_defaults.get(f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            tp, _ = _strip_optional(hints[f.name])
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"default: {default!r}", "metavar": f.name.upper()}
            if typing.get_origin(tp) is list:
                kwargs["nargs"] = "*"
            flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
            group.add_argument(*flags, dest=f.name, **kwargs)  # --comm_codec and --comm-codec
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ExperimentConfig:
    """Parse ``argv``: dataclass defaults, then ``--yaml_config``, then the other flags.

    Args:
        argv (list[str], optional): arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        ExperimentConfig: the merged, validated configuration.

    Example::

        >>> parse_config(["--model_type", "dlrm_dcn", "--compression", "none"]).model.model_type
        'dlrm_dcn'
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--yaml_config", "--config", dest="yaml_config", default=None)
    pre_args, _ = pre.parse_known_args(argv)
    yaml_overrides = load_yaml(pre_args.yaml_config) if pre_args.yaml_config else {}
    args = vars(_build_parser(yaml_overrides).parse_args(argv))
    args.pop("yaml_config", None)
    merged = {**yaml_overrides, **args}
    cfg = config_from_dict(merged)
    logger.debug("config: %s", json.dumps(cfg.to_dict()))
    return cfg
