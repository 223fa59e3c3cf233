"""``TTEmbeddingBagCollection``: a drop-in for torchrec's ``EmbeddingBagCollection``.

Tables configured with :class:`TTEmbeddingBagConfig` are stored as TT cores
(:class:`~torchrec_tt.modules.TTEmbeddingBag`); plain ``EmbeddingBagConfig``
tables in the same collection are stored uncompressed (``nn.EmbeddingBag``), so
a whole model converts by swapping configs. This module imports torchrec.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import (
    DataType,
    EmbeddingBagConfig,
    PoolingType,
    data_type_to_dtype,
)
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt.modules.tt_embedding_bag import TTEmbeddingBag
from torchrec_tt.modules.tt_embedding_configs import is_tt_config, uses_cache

logger = logging.getLogger(__name__)

__all__ = ["TTEmbeddingBagCollection", "concat_feature_bags"]

_POOLING = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def concat_feature_bags(
    values: list[Tensor], lengths: list[Tensor], weights: list[Tensor] | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Concatenate the bags of several features into one ``(ids, B_total + 1 offsets, weights)`` call.

    One lookup per table (instead of one per feature) lets a fused optimizer see all
    of a table's ids in one backward, exactly as for a single feature.

    Args:
        values (list[Tensor]): ids per feature.
        lengths (list[Tensor]): bag lengths per feature.
        weights (list[Tensor], optional): per-id weights per feature.

    Returns:
        tuple: ids, offsets (``sum(B_f) + 1`` entries, int64), weights or None.

    Example::

        >>> ids, off, w = concat_feature_bags([torch.tensor([1, 2]), torch.tensor([3])],
        ...                                   [torch.tensor([2, 0]), torch.tensor([1])], None)
        >>> off.tolist()
        [0, 2, 2, 3]
    """
    ids = values[0] if len(values) == 1 else torch.cat(values)
    lens = lengths[0] if len(lengths) == 1 else torch.cat(lengths)
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.long, device=lens.device)
    torch.cumsum(lens.long(), dim=0, out=offsets[1:])
    w = None
    if weights is not None:
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()
    return ids, offsets, w


class TTEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A collection of pooled embedding tables, TT-compressed where configured.

    Same contract as torchrec's ``EmbeddingBagCollection``: a ``KeyedJaggedTensor``
    of shape ``(F, B, L[f][i])`` goes in, a ``KeyedTensor`` of ``(B, sum(D))`` comes
    out whose keys are the feature names (``"feature@table"`` for a feature shared
    by several tables), in table order. SUM and MEAN pooling, weighted features
    (``is_weighted=True``; also with MEAN, which divides the weighted sum by the bag
    length), meta-device construction and ``reset_parameters()`` are supported.
    The output is float32 like the stock module.

    TT tables are ``TTEmbeddingBag(sparse=False)``: the cores get ordinary
    gradients (train them with any ``torch.optim`` optimizer) until the collection
    is sharded, where the sharder fuses the optimizer into backward.

    Args:
        tables (list[EmbeddingBagConfig]): ``TTEmbeddingBagConfig`` (compressed) and/or
            plain ``EmbeddingBagConfig`` (stored uncompressed) tables.
        is_weighted (bool): whether the input KJT carries per-id weights.
        device (torch.device, optional): where parameters live (``"meta"`` allowed).

    Example::

        >>> tables = [
        ...     TTEmbeddingBagConfig(name="t0", num_embeddings=1000, embedding_dim=8, feature_names=["f0"], tt_ranks=4),
        ...     EmbeddingBagConfig(name="t1", num_embeddings=10, embedding_dim=8, feature_names=["f1"]),
        ... ]
        >>> ebc = TTEmbeddingBagCollection(tables)
        >>> #        0       1        2  <-- batch
        >>> # f0   [0,1]    None    [2]
        >>> # f1   [3]      [4]     [5,6,7]
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f0", "f1"], values=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]),
        ...     lengths=torch.tensor([2, 0, 1, 1, 1, 3]))
        >>> ebc(kjt).values().shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        torch._C._log_api_usage_once("torchrec_tt.modules.TTEmbeddingBagCollection")
        self._is_weighted = is_weighted
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._embedding_bag_configs = tables
        self._validate(tables)
        bags: dict[str, nn.Module] = {}
        for cfg in tables:
            dtype = data_type_to_dtype(cfg.data_type)
            if is_tt_config(cfg):
                bags[cfg.name] = TTEmbeddingBag(
                    cfg.num_embeddings, cfg.embedding_dim, cfg.tt_p_shapes, cfg.tt_q_shapes, cfg.tt_ranks,
                    weight_dist=cfg.weight_dist, mode=_POOLING[cfg.pooling], include_last_offset=True,
                    name=cfg.name, device=self._device, dtype=dtype,
                )
            else:
                bags[cfg.name] = nn.EmbeddingBag(
                    cfg.num_embeddings, cfg.embedding_dim, mode=_POOLING[cfg.pooling], include_last_offset=True,
                    device=self._device, dtype=dtype,
                )
        self.embedding_bags: nn.ModuleDict = nn.ModuleDict(bags)
        self._embedding_names_by_table = get_embedding_names_by_table(tables)
        self._embedding_names = [n for names in self._embedding_names_by_table for n in names]
        self._lengths_per_embedding = [cfg.embedding_dim for cfg in tables for _ in cfg.feature_names]
        self._reset_plain_tables()

    @staticmethod
    def _validate(tables: list[EmbeddingBagConfig]) -> None:
        seen: set[str] = set()
        for cfg in tables:
            if not isinstance(cfg, EmbeddingBagConfig):
                raise TypeError(f"TTEmbeddingBagCollection: tables must be EmbeddingBagConfig, got {type(cfg).__name__}")
            if cfg.name in seen:
                raise ValueError(f"TTEmbeddingBagCollection: duplicate table name '{cfg.name}'")
            seen.add(cfg.name)
            if not cfg.feature_names:
                raise ValueError(f"TTEmbeddingBagCollection: table '{cfg.name}' has no feature_names")
            if len(set(cfg.feature_names)) != len(cfg.feature_names):
                raise ValueError(f"TTEmbeddingBagCollection: table '{cfg.name}' lists a feature twice: {cfg.feature_names}")
            if cfg.pooling not in _POOLING:
                raise ValueError(
                    f"TTEmbeddingBagCollection: table '{cfg.name}': pooling {cfg.pooling} is not supported "
                    f"(supported: {[p.name for p in _POOLING]})"
                )
            if cfg.data_type not in (DataType.FP32, DataType.FP16, DataType.BF16):
                raise ValueError(
                    f"TTEmbeddingBagCollection: table '{cfg.name}': data_type {cfg.data_type} is not supported "
                    "(FP32, FP16, BF16)"
                )

    # ------------------------------------------------------------------ interface
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def tt_tables(self) -> dict[str, TTEmbeddingBag]:
        """The TT-compressed tables by name."""
        return {n: m for n, m in self.embedding_bags.items() if isinstance(m, TTEmbeddingBag)}

    def reset_parameters(self) -> None:
        """Re-initialise every table (TT: its ``weight_dist``; plain: the config's ``init_fn``)."""
        if self._device.type == "meta":
            return
        for cfg in self._embedding_bag_configs:
            bag = self.embedding_bags[cfg.name]
            if isinstance(bag, TTEmbeddingBag):
                bag.reset_parameters()
        self._reset_plain_tables()

    @torch.no_grad()
    def _reset_plain_tables(self) -> None:
        if self._device.type == "meta":
            return
        for cfg in self._embedding_bag_configs:
            if is_tt_config(cfg):
                continue
            weight = self.embedding_bags[cfg.name].weight
            if cfg.init_fn is not None:
                cfg.init_fn(weight)
            else:
                bound = math.sqrt(1.0 / cfg.num_embeddings)
                weight.uniform_(-bound, bound)

    # ------------------------------------------------------------------ forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled lookups of every feature.

        Args:
            features (KeyedJaggedTensor): KJT of form ``[F X B X L]``.

        Returns:
            KeyedTensor: ``(B, sum of embedding dims)``, keys as ``embedding_names``.
        """
        feature_dict = features.to_dict()
        missing = [f for cfg in self._embedding_bag_configs for f in cfg.feature_names if f not in feature_dict]
        if missing:
            raise KeyError(f"TTEmbeddingBagCollection: features {missing} are missing from the input KJT {features.keys()}")
        pooled: list[Tensor] = []
        for cfg in self._embedding_bag_configs:
            jts = [feature_dict[f] for f in cfg.feature_names]
            batch = [jt.lengths().numel() for jt in jts]
            ids, offsets, weights = concat_feature_bags(
                [jt.values() for jt in jts],
                [jt.lengths() for jt in jts],
                [jt.weights() for jt in jts] if self._is_weighted else None,
            )
            out = self._lookup(cfg, ids, offsets, weights)
            pooled.extend(torch.split(out.float(), batch, dim=0))
        if not pooled:
            return KeyedTensor(keys=[], length_per_key=[], values=torch.empty(features.stride(), 0, device=self._device))
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._lengths_per_embedding,
            values=torch.cat(pooled, dim=1),
            key_dim=1,
        )

    def _lookup(self, cfg: EmbeddingBagConfig, ids: Tensor, offsets: Tensor, weights: Tensor | None) -> Tensor:
        bag = self.embedding_bags[cfg.name]
        if uses_cache(cfg) and self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"TTEmbeddingBagCollection: table '{cfg.name}' has use_cache=True; its cache is trained by a fused "
                "optimizer, which the sharder provides: shard the collection with DistributedModelParallel (a world "
                "size of 1 works) to train it, or set use_cache=False. Unsharded, the collection runs the cores only "
                "(eval / no_grad)."
            )
        if isinstance(bag, TTEmbeddingBag):
            return bag(ids, offsets, weights)
        if weights is not None and cfg.pooling == PoolingType.MEAN:
            # nn.EmbeddingBag accepts weights only with sum: weighted sum / bag length (as the TT op).
            out = nn.functional.embedding_bag(
                ids, bag.weight, offsets, mode="sum", per_sample_weights=weights.to(bag.weight.dtype),
                include_last_offset=True,
            )
            lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(out.dtype)
            return out / lengths.unsqueeze(1)
        return bag(ids, offsets, None if weights is None else weights.to(bag.weight.dtype))

    def extra_repr(self) -> str:
        return f"is_weighted={self._is_weighted}, device={self._device}"
