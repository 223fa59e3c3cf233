"""``OptimType``: FBTT-Embedding's (and FBGEMM's) optimizer names, and what runs.

Every update torchrec_tt applies is *exact*: duplicate ids are coalesced and each
touched slice of each core is updated once per step. So ``SGD`` and
``EXACT_SGD`` are the same update (FBGEMM's plain ``SGD`` is a non-deterministic
approximation), and so are ``ROWWISE_ADAGRAD`` and ``EXACT_ROWWISE_ADAGRAD``.
Members that are not implemented raise ``NotImplementedError`` instead of being
silently replaced (FBTT turned all of them into Adagrad).
"""

from __future__ import annotations

import enum
from typing import Any

from torchrec_tt.ops import FusedOptimizer

__all__ = ["OptimType", "to_fused_optimizer"]


@enum.unique
class OptimType(enum.Enum):
    """Optimizer of a ``sparse=True`` table (values as FBGEMM's ``EmbOptimType``)."""

    SGD = "sgd"
    EXACT_SGD = "exact_sgd"
    LAMB = "lamb"
    ADAM = "adam"
    EXACT_ADAGRAD = "exact_adagrad"
    EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"
    LARS_SGD = "lars_sgd"
    PARTIAL_ROWWISE_ADAM = "partial_row_wise_adam"
    PARTIAL_ROWWISE_LAMB = "partial_row_wise_lamb"
    ROWWISE_ADAGRAD = "row_wise_adagrad"

    def __str__(self) -> str:
        return self.value


_SUPPORTED = {
    OptimType.SGD: FusedOptimizer.SGD,
    OptimType.EXACT_SGD: FusedOptimizer.SGD,
    OptimType.EXACT_ADAGRAD: FusedOptimizer.ADAGRAD,
    OptimType.EXACT_ROWWISE_ADAGRAD: FusedOptimizer.ROWWISE_ADAGRAD,
    OptimType.ROWWISE_ADAGRAD: FusedOptimizer.ROWWISE_ADAGRAD,
}


def to_fused_optimizer(optimizer: Any) -> FusedOptimizer:
    """Map an ``OptimType`` (or FBGEMM ``EmbOptimType``, or its string value) to the fused op's optimizer.

    Args:
        optimizer: ``OptimType``, an enum with the same ``.value`` strings, or a string.

    Raises:
        NotImplementedError: for a known optimizer that torchrec_tt does not implement.
        ValueError: for an unknown name.

    Example::

        >>> to_fused_optimizer(OptimType.EXACT_ADAGRAD)
        <FusedOptimizer.ADAGRAD: 1>
    """
    value = getattr(optimizer, "value", optimizer)
    try:
        opt = OptimType(str(value).lower())
    except ValueError:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; expected an OptimType: {[o.name for o in OptimType]}"
        ) from None
    if opt not in _SUPPORTED:
        raise NotImplementedError(
            f"optimizer {opt.name} is not implemented for fused TT updates; supported: "
            f"{[o.name for o in _SUPPORTED]} (or use sparse=False with any torch.optim optimizer)"
        )
    return _SUPPORTED[opt]
