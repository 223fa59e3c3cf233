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

__all__ = ["HAS_CPP_KERNELS", "HAS_CUDA_KERNELS", "OptimType", "TTEmbeddingBag", "ops"]
