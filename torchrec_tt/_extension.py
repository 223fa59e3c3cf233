"""Loads the compiled kernels (``torchrec_tt._C``) if they were built.

Without them every op still works through the pure-PyTorch reference kernels
(:mod:`torchrec_tt.ops.reference`); one warning says so. Environment:

* ``TORCHREC_TT_DISABLE_EXT=1``: do not load ``_C`` (reference kernels only).
* ``TORCHREC_TT_VERBOSE=1``: log the full traceback when loading fails.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["HAS_CPP_KERNELS", "HAS_CUDA_KERNELS", "build_info"]


def _load() -> bool:
    if os.environ.get("TORCHREC_TT_DISABLE_EXT", "0") == "1":
        logger.info("torchrec_tt: TORCHREC_TT_DISABLE_EXT=1, using the reference kernels")
        return False
    try:
        importlib.import_module("torchrec_tt._C")
    except ImportError as e:
        logger.warning(
            "torchrec_tt: compiled kernels not available (%s); using the pure-PyTorch reference "
            "kernels. Build them with `pip install --no-build-isolation -e .`.",
            e,
            exc_info=os.environ.get("TORCHREC_TT_VERBOSE", "0") == "1",
        )
        return False
    return True


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("torchrec_tt::tt_embedding_bag_forward", dispatch_key)


def build_info() -> dict[str, Any]:
    """What the compiled extension was built with (empty if it was not built).

    Example::

        >>> isinstance(build_info(), dict)
        True
    """
    path = Path(__file__).with_name("_build_info.json")
    return json.loads(path.read_text()) if path.exists() else {}


HAS_CPP_KERNELS: bool = _load() and _has_kernel("CPU")
HAS_CUDA_KERNELS: bool = HAS_CPP_KERNELS and _has_kernel("CUDA")
