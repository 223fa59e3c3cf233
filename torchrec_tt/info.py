"""``python -m torchrec_tt.info``: what this installation of torchrec_tt can do.

Example::

    >>> "torch" in collect_info()
    True
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import torch

import torchrec_tt
from torchrec_tt._extension import build_info

__all__ = ["collect_info"]


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001  (any import failure means "not usable")
        return None


def collect_info() -> dict[str, Any]:
    """Versions, compiled kernels and devices, as a JSON-serialisable dict."""
    return {
        "torchrec_tt": torchrec_tt.__version__,
        "torch": torch.__version__,
        "torchrec": _version("torchrec"),
        "fbgemm_gpu": _version("fbgemm_gpu"),
        "cpp_kernels": torchrec_tt.HAS_CPP_KERNELS,
        "cuda_kernels": torchrec_tt.HAS_CUDA_KERNELS,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "build": build_info(),
    }


if __name__ == "__main__":
    print(json.dumps(collect_info(), indent=2))
