"""nn.Modules of torchrec_tt: the TT embedding bag and its building blocks.

``TTEmbeddingBagConfig`` and ``TTEmbeddingBagCollection`` need torchrec; they are
imported lazily on first access so that ``import torchrec_tt`` does not import torchrec.
"""

from typing import Any

from torchrec_tt.modules.optim_types import OptimType
from torchrec_tt.modules.tt_embedding_bag import TTEmbeddingBag
from torchrec_tt.modules.tt_shapes import factorize_cols, factorize_rows, resolve_tt_shapes, tt_num_parameters
from torchrec_tt.modules.tt_svd import tt_svd

_LAZY = {
    "TTEmbeddingBagConfig": "torchrec_tt.modules.tt_embedding_configs",
    "align_config_for_row_wise": "torchrec_tt.modules.tt_embedding_configs",
    "TTEmbeddingBagCollection": "torchrec_tt.modules.tt_embedding_modules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OptimType",
    "TTEmbeddingBag",
    "TTEmbeddingBagCollection",
    "TTEmbeddingBagConfig",
    "align_config_for_row_wise",
    "factorize_cols",
    "factorize_rows",
    "resolve_tt_shapes",
    "tt_num_parameters",
    "tt_svd",
]
