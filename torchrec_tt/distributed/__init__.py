"""Distributed TT tables: DMP sharder, sharded module, planner plugin, fbgemm CUDA fallback.

Importing this package imports torchrec.
"""

from torchrec_tt.distributed.tt_embeddingbag import (
    TT_COMPUTE_KERNEL,
    ShardedTTEmbeddingBagCollection,
    TTEmbeddingBagCollectionSharder,
    TTFusedOptimizer,
    resolve_table_optimizer,
)

__all__ = [
    "TT_COMPUTE_KERNEL",
    "ShardedTTEmbeddingBagCollection",
    "TTEmbeddingBagCollectionSharder",
    "TTFusedOptimizer",
    "resolve_table_optimizer",
]
