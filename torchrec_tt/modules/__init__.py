"""nn.Modules of torchrec_tt: the TT embedding bag and its building blocks."""

from torchrec_tt.modules.optim_types import OptimType
from torchrec_tt.modules.tt_embedding_bag import TTEmbeddingBag
from torchrec_tt.modules.tt_shapes import factorize_cols, factorize_rows, resolve_tt_shapes, tt_num_parameters
from torchrec_tt.modules.tt_svd import tt_svd

__all__ = [
    "OptimType",
    "TTEmbeddingBag",
    "factorize_cols",
    "factorize_rows",
    "resolve_tt_shapes",
    "tt_num_parameters",
    "tt_svd",
]
