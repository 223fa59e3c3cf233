"""Dispatcher ops of torchrec_tt (``torch.ops.torchrec_tt.*``) and their Python API."""

from torchrec_tt.ops._library import FusedOptimizer, PoolingMode
from torchrec_tt.ops.tt_embedding_bag import (
    lfu_cache_record_,
    per_sample_weights_grad,
    tt_cached_embedding_bag,
    tt_cached_embedding_bag_backward_fused_,
    tt_embedding_bag,
    tt_embedding_bag_backward,
    tt_embedding_bag_backward_fused_,
    tt_embedding_bag_for_backward,
    tt_lookup_rows,
)

__all__ = [
    "FusedOptimizer",
    "PoolingMode",
    "lfu_cache_record_",
    "per_sample_weights_grad",
    "tt_cached_embedding_bag",
    "tt_cached_embedding_bag_backward_fused_",
    "tt_embedding_bag",
    "tt_embedding_bag_backward",
    "tt_embedding_bag_backward_fused_",
    "tt_embedding_bag_for_backward",
    "tt_lookup_rows",
]
