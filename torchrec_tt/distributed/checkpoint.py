"""Save / load sharded models with TT tables through ``torch.distributed.checkpoint`` (DCP).

The sharded TT module writes canonical global cores (see
:mod:`torchrec_tt.distributed.tt_embeddingbag`), so a checkpoint written under one
plan / world size loads under any other. These helpers add one thing to plain
``dcp.save`` / ``dcp.load``: before anything is read, every tensor's global shape is
checked against the checkpoint's metadata, and a mismatch (e.g. a table with other
TT shapes) raises an error naming the key, with the model and optimizer untouched.

LFU caches (``use_cache=True`` tables) are saved with the model: they load into the
same cache configuration and shard layout (placement may differ). A checkpoint
without caches loads into cached tables with empty caches; a checkpoint with caches
is refused by tables without one (flush the caches with ``cache_flush()`` before
saving to move such a table to another layout or to ``use_cache=False``).

The model may emit ``ShardedTensor`` (default) or ``DTensor`` (``ShardingEnv(...,
output_dtensor=True)``) state; the checkpoint does not depend on which, so a checkpoint
saved with one loads with the other, under any plan / world size.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "save_checkpoint", "validate_checkpoint"]


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _flatten(f"{prefix}.{i}", v, out)
    elif hasattr(obj, "shape"):
        out[prefix] = obj


def _cache_table(key: str) -> str | None:
    """The table of a cache checkpoint key (``...embedding_bags.<table>.cache.<buffer>``), else None."""
    parts = key.split(".")
    if len(parts) >= 4 and parts[-2] == "cache" and parts[-4] == "embedding_bags":
        return parts[-3]
    return None


def _drop_caches_missing_from(
    model_state: dict[str, Any], saved: dict[str, Any], checkpoint_id: str | os.PathLike[str]
) -> None:
    """Tables whose cache the checkpoint lacks load with an empty cache: do not ask DCP for it."""
    saved_tables = {_cache_table(k) for k in saved} - {None}
    for key in [k for k in model_state if _cache_table(k) is not None and _cache_table(k) not in saved_tables]:
        logger.info("checkpoint %s has no cache for %s: it loads with an empty cache", os.fspath(checkpoint_id), key)
        del model_state[key]


def _state(model: nn.Module, optimizer: Any | None) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    return state


def save_checkpoint(model: nn.Module, checkpoint_id: str | os.PathLike[str], optimizer: Any | None = None) -> None:
    """Save ``model.state_dict()`` (and ``optimizer.state_dict()``, e.g. ``dmp.fused_optimizer``) with DCP.

    Args:
        model (nn.Module): e.g. a ``DistributedModelParallel``.
        checkpoint_id (str or PathLike): checkpoint directory.
        optimizer (KeyedOptimizer, optional): optimizer whose state is saved too.

    Example::

        >>> save_checkpoint(dmp, "/tmp/ckpt", dmp.fused_optimizer)
    """
    dcp.save(_state(model, optimizer), checkpoint_id=checkpoint_id)


def validate_checkpoint(state: dict[str, Any], checkpoint_id: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming every tensor whose global shape differs from the checkpoint's.

    Args:
        state (dict): the (nested) state dict that is about to be loaded.
        checkpoint_id (str or PathLike): checkpoint directory.

    Raises:
        ValueError: keys missing from the checkpoint or with another global shape.
    """
    _validate(state, _saved_metadata(checkpoint_id), checkpoint_id)


def _saved_metadata(checkpoint_id: str | os.PathLike[str]) -> dict[str, Any]:
    return dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata


def _validate(state: dict[str, Any], saved: dict[str, Any], checkpoint_id: str | os.PathLike[str]) -> None:
    flat: dict[str, Any] = {}
    _flatten("", state, flat)
    problems = []
    cached_tables = {_cache_table(k) for k in flat} - {None}
    for key in saved:
        table = _cache_table(key)
        if table is not None and table not in cached_tables:
            problems.append(f"{key}: an LFU cache of table '{table}', which has no cache in the model (cache_flush() it before saving)")
    for key, tensor in flat.items():
        meta = saved.get(key)
        if meta is None:
            problems.append(f"{key}: not in the checkpoint")
        elif isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(tensor.shape):
            problems.append(f"{key}: checkpoint has global shape {tuple(meta.size)}, the model {tuple(tensor.shape)}")
    if problems:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint_id)} does not match the model (e.g. other TT shapes/ranks or "
            "another optimizer); nothing was loaded:\n  " + "\n  ".join(problems)
        )


def load_checkpoint(model: nn.Module, checkpoint_id: str | os.PathLike[str], optimizer: Any | None = None) -> None:
    """Validate, then load a DCP checkpoint into ``model`` (and ``optimizer``), under any plan / world size.

    Args:
        model (nn.Module): e.g. a ``DistributedModelParallel``.
        checkpoint_id (str or PathLike): checkpoint directory written by :func:`save_checkpoint`.
        optimizer (KeyedOptimizer, optional): optimizer whose state is loaded too.

    Raises:
        ValueError: the checkpoint does not match (nothing is modified).

    Example::

        >>> load_checkpoint(dmp, "/tmp/ckpt", dmp.fused_optimizer)
    """
    state = _state(model, optimizer)
    saved = _saved_metadata(checkpoint_id)
    _drop_caches_missing_from(state["model"], saved, checkpoint_id)
    _validate(state, saved, checkpoint_id)
    dcp.load(state, checkpoint_id=checkpoint_id)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
