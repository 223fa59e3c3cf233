"""``TTEmbeddingBagConfig``: an ``EmbeddingBagConfig`` whose table is stored as TT cores.

Swapping ``EmbeddingBagConfig`` for ``TTEmbeddingBagConfig`` (same ``name``,
``num_embeddings``, ``embedding_dim``, ``feature_names``, ``pooling``) and
``EmbeddingBagCollection`` for :class:`~torchrec_tt.modules.tt_embedding_modules.TTEmbeddingBagCollection`
converts a model. ``num_embeddings`` / ``embedding_dim`` stay the *logical*
table size: torchrec uses them for input bucketization, shard sizes and output
dims. This module imports torchrec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_tt.modules.tt_cache import EvictionPolicy
from torchrec_tt.modules.tt_init import WEIGHT_DISTS
from torchrec_tt.modules.tt_shapes import resolve_tt_shapes, tt_num_parameters

__all__ = ["TTEmbeddingBagConfig", "align_config_for_row_wise", "is_tt_config", "tt_config_shapes", "uses_cache"]


@dataclass
class TTEmbeddingBagConfig(EmbeddingBagConfig):
    """Configuration of one pooled embedding table stored as Tensor-Train cores.

    All ``EmbeddingBagConfig`` fields keep their meaning. After construction
    ``tt_p_shapes``, ``tt_q_shapes`` and ``tt_ranks`` hold the resolved shapes
    (derived by :func:`torchrec_tt.modules.resolve_tt_shapes` when omitted);
    ``tt_ranks`` holds the ``d - 1`` inner ranks.

    Args:
        tt_p_shapes (list[int], optional): row factorisation, ``prod >= num_embeddings``.
        tt_q_shapes (list[int], optional): column factorisation, ``prod == embedding_dim``.
        tt_ranks (int or list[int]): inner TT ranks (one int: all equal). Default 16.
        weight_dist (str): core initialisation (see :mod:`torchrec_tt.modules.tt_init`).
        use_cache (bool): give every shard of this table an LFU cache of its hot rows
            (:class:`~torchrec_tt.modules.tt_cache.TTRowCache`); trained by the sharder's
            fused optimizer, so the table must be sharded (``DistributedModelParallel``,
            any world size) to train, and not data-parallel.
        cache_size (int): cached rows per shard.
        hashtbl_size (int): frequency hash-table slots per shard (``0``: ``4 * cache_size``).
        cache_eviction_policy (str): ``"writeback"`` or ``"discard"``.
        cache_populate_interval (int): repopulate every this many training lookups (``0``: manual).
        cache_count_decay (float): in ``[0, 1]``: access counts are multiplied by it after every
            populate (``1``: pure LFU).

    Raises:
        ValueError: naming the table and the violated shape constraint.

    Example::

        >>> cfg = TTEmbeddingBagConfig(name="t0", num_embeddings=1000, embedding_dim=16,
        ...                            feature_names=["f0"], tt_ranks=[8, 8])
        >>> cfg.tt_p_shapes, cfg.tt_q_shapes, cfg.tt_ranks
        ([10, 10, 10], [4, 2, 2], [8, 8])
    """

    tt_p_shapes: list[int] | None = None
    tt_q_shapes: list[int] | None = None
    tt_ranks: int | list[int] = 16
    weight_dist: str = "approx-normal"
    use_cache: bool = False
    cache_size: int = 0
    hashtbl_size: int = 0
    cache_eviction_policy: str = "writeback"
    cache_populate_interval: int = 0
    cache_count_decay: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_cache:
            policies = [p.value for p in EvictionPolicy]
            if self.cache_size <= 0 or self.cache_populate_interval < 0 or self.cache_eviction_policy not in policies:
                raise ValueError(
                    f"TTEmbeddingBagConfig '{self.name}': use_cache=True needs cache_size > 0 (got {self.cache_size}), "
                    f"cache_populate_interval >= 0 (got {self.cache_populate_interval}) and cache_eviction_policy in "
                    f"{policies} (got {self.cache_eviction_policy!r})"
                )
            if not 0.0 <= self.cache_count_decay <= 1.0:
                raise ValueError(
                    f"TTEmbeddingBagConfig '{self.name}': cache_count_decay must be in [0, 1], got {self.cache_count_decay}"
                )
            if self.hashtbl_size and self.hashtbl_size < self.cache_size:
                raise ValueError(
                    f"TTEmbeddingBagConfig '{self.name}': hashtbl_size ({self.hashtbl_size}) must be >= cache_size "
                    f"({self.cache_size}) or 0"
                )
        if self.weight_dist not in WEIGHT_DISTS:
            raise ValueError(
                f"TTEmbeddingBagConfig '{self.name}': weight_dist must be one of {WEIGHT_DISTS}, got {self.weight_dist!r}"
            )
        try:
            p, q, ranks = resolve_tt_shapes(
                self.num_embeddings, self.embedding_dim, self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks
            )
        except ValueError as e:
            raise ValueError(f"TTEmbeddingBagConfig '{self.name}': {e}") from None
        self.tt_p_shapes, self.tt_q_shapes, self.tt_ranks = p, q, ranks[1:-1]

    @property
    def full_tt_ranks(self) -> list[int]:
        """``[1, r_1, ..., r_{d-1}, 1]``."""
        return [1, *self.tt_ranks, 1]

    def num_tt_parameters(self) -> int:
        """Scalars stored in the cores (vs ``num_embeddings * embedding_dim`` uncompressed)."""
        return tt_num_parameters(self.tt_p_shapes, self.tt_q_shapes, self.full_tt_ranks)


def is_tt_config(config: EmbeddingBagConfig) -> bool:
    """Whether ``config`` describes a TT-compressed table."""
    return isinstance(config, TTEmbeddingBagConfig)


def tt_config_shapes(config: EmbeddingBagConfig) -> tuple[list[int], list[int], list[int]]:
    """``(p, q, full ranks)`` of a table; a plain table is a one-core TT ``([N], [D], [1, 1])``.

    Example::

        >>> tt_config_shapes(EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"]))
        ([10], [4], [1, 1])
    """
    if is_tt_config(config):
        return list(config.tt_p_shapes), list(config.tt_q_shapes), config.full_tt_ranks
    return [config.num_embeddings], [config.embedding_dim], [1, 1]


def align_config_for_row_wise(config: TTEmbeddingBagConfig, world_size: int) -> TTEmbeddingBagConfig:
    """A copy of ``config`` whose row-wise shards over ``world_size`` ranks are whole first-core slices.

    Row-wise sharding gives rank ``r`` the rows ``[r*B, (r+1)*B)`` with
    ``B = ceil(num_embeddings / world_size)`` (torchrec's bucketization), and a
    TT rank can only own whole slices of the first core, i.e. ``B`` must be a
    multiple of ``P_2 = prod(tt_p_shapes[1:])``. This rounds ``tt_p_shapes[0]`` up
    to a multiple of ``world_size`` and pads ``num_embeddings`` to ``prod(tt_p_shapes)``
    (the padded ids are never looked up; the first core grows by less than
    ``world_size`` slices).

    Args:
        config (TTEmbeddingBagConfig): the table.
        world_size (int): number of row-wise shards.

    Returns:
        TTEmbeddingBagConfig: the aligned copy (``config`` itself when already aligned).

    Example::

        >>> cfg = TTEmbeddingBagConfig(name="t", num_embeddings=999, embedding_dim=8,
        ...                            feature_names=["f"], tt_p_shapes=[10, 10, 10], tt_ranks=4)
        >>> align_config_for_row_wise(cfg, 4).num_embeddings
        1200
    """
    if world_size < 1:
        raise ValueError(f"align_config_for_row_wise '{config.name}': world_size must be >= 1, got {world_size}")
    inner = math.prod(config.tt_p_shapes[1:])
    if math.ceil(config.num_embeddings / world_size) % inner == 0:
        return config
    p1 = math.ceil(config.tt_p_shapes[0] / world_size) * world_size
    p = [p1, *config.tt_p_shapes[1:]]
    return replace(config, num_embeddings=math.prod(p), tt_p_shapes=p, tt_q_shapes=list(config.tt_q_shapes),
                   tt_ranks=list(config.tt_ranks))


def uses_cache(config: EmbeddingBagConfig) -> bool:
    """Whether ``config`` is a TT table with ``use_cache=True``."""
    return bool(getattr(config, "use_cache", False))
