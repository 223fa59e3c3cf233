"""Distributed TT tables: DMP sharder, sharded module, planner plugin, fbgemm CUDA fallback, comm codecs.

Importing this package imports torchrec.
"""

from torchrec_tt.distributed.comm_codec import (
    BoundSchedule,
    ErrorBoundedCommCodec,
    ErrorBoundPolicy,
    comm_codec_policies,
    get_error_bounded_codecs_registry,
    make_comm_codecs_registry,
)
from torchrec_tt.distributed.tt_embeddingbag import (
    TT_COMPUTE_KERNEL,
    ShardedTTEmbeddingBagCollection,
    TTEmbeddingBagCollectionSharder,
    TTFusedOptimizer,
    resolve_table_optimizer,
)

__all__ = [
    "TT_COMPUTE_KERNEL",
    "BoundSchedule",
    "ErrorBoundPolicy",
    "ErrorBoundedCommCodec",
    "ShardedTTEmbeddingBagCollection",
    "TTEmbeddingBagCollectionSharder",
    "TTFusedOptimizer",
    "comm_codec_policies",
    "get_error_bounded_codecs_registry",
    "make_comm_codecs_registry",
    "resolve_table_optimizer",
]
