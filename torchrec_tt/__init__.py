"""torchrec_tt: Tensor-Train compressed embedding tables for TorchRec.

Example::

    >>> import torch
    >>> from torchrec_tt import TTEmbeddingBag
    >>> emb = TTEmbeddingBag(1000, 16, tt_ranks=[4, 4])
    >>> emb(torch.tensor([1, 2, 999]), torch.tensor([0, 2])).shape
    torch.Size([2, 16])
"""

from torchrec_tt import ops  # defines the dispatcher ops and registers the reference kernels
from torchrec_tt._extension import HAS_CPP_KERNELS, HAS_CUDA_KERNELS
from torchrec_tt.modules import OptimType, TTEmbeddingBag

__version__ = "0.1.0"

_LAZY = ("TTEmbeddingBagConfig", "TTEmbeddingBagCollection")  # need torchrec: resolved by torchrec_tt.modules


def __getattr__(name: str) -> object:
    # Imported on first access so that `import torchrec_tt` stays torchrec-free.
    if name in _LAZY:
        from torchrec_tt import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HAS_CPP_KERNELS",
    "HAS_CUDA_KERNELS",
    "OptimType",
    "TTEmbeddingBag",
    "TTEmbeddingBagCollection",
    "TTEmbeddingBagConfig",
    "ops",
]
