"""TT shapes: automatic factorisation, validation, sizes, layouts.

A table of ``num_embeddings x embedding_dim`` becomes ``d`` cores; core ``k``
holds ``p_k`` slices of shape ``(r_k, q_k, r_{k+1})`` with
``prod(p) >= num_embeddings`` (the excess rows are padding that is never looked
up) and ``prod(q) == embedding_dim``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch  # noqa: F401  (used by the doctest examples)
from torch import Tensor

__all__ = [
    "canonical_to_internal",
    "factorize_cols",
    "factorize_rows",
    "full_ranks",
    "internal_to_canonical",
    "resolve_tt_shapes",
    "tt_flops_per_row",
    "tt_num_parameters",
]

DEFAULT_NUM_CORES = 3


def _prime_factors(n: int) -> list[int]:
    factors, f = [], 2
    while f * f <= n:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    if n > 1:
        factors.append(n)
    return factors


def factorize_cols(embedding_dim: int, num_cores: int = DEFAULT_NUM_CORES) -> list[int]:
    """Split ``embedding_dim`` into ``num_cores`` factors as balanced as possible.

    The product is exact (no padding in the column direction). Prime factors are
    dealt, largest first, to the factor with the smallest product; factors of 1
    appear when ``embedding_dim`` has fewer prime factors than cores.

    Args:
        embedding_dim (int): the embedding dimension ``D``.
        num_cores (int): number of TT cores ``d``.

    Returns:
        list[int]: ``q`` with ``prod(q) == embedding_dim``, in descending order.

    Example::

        >>> factorize_cols(64, 3)
        [4, 4, 4]
        >>> factorize_cols(3, 3)
        [3, 1, 1]
    """
    if embedding_dim < 1 or num_cores < 1:
        raise ValueError(f"embedding_dim ({embedding_dim}) and num_cores ({num_cores}) must be positive")
    q = [1] * num_cores
    for f in sorted(_prime_factors(embedding_dim), reverse=True):
        q[q.index(min(q))] *= f
    return sorted(q, reverse=True)


def factorize_rows(num_embeddings: int, num_cores: int = DEFAULT_NUM_CORES) -> list[int]:
    """Choose ``p`` with ``prod(p) >= num_embeddings``, balanced, with little padding.

    Starts from ``ceil(num_embeddings ** (1/d))`` in every slot and lowers each
    factor, first to last, as far as the product stays ``>= num_embeddings``; an
    exact balanced factorisation is taken when one exists with the same largest
    factor. The padding ``prod(p) - num_embeddings`` is visible to the caller
    (``TTEmbeddingBag.num_padded_rows``).

    Args:
        num_embeddings (int): number of rows ``N``.
        num_cores (int): number of TT cores ``d``.

    Returns:
        list[int]: ``p``, in descending order.

    Example::

        >>> factorize_rows(1000, 3)
        [10, 10, 10]
        >>> factorize_rows(10, 3)
        [3, 2, 2]
    """
    if num_embeddings < 1 or num_cores < 1:
        raise ValueError(f"num_embeddings ({num_embeddings}) and num_cores ({num_cores}) must be positive")
    base = 1
    while base**num_cores < num_embeddings:
        base += 1
    p = [base] * num_cores
    for k in range(num_cores):
        while p[k] > 1 and math.prod(p) // p[k] * (p[k] - 1) >= num_embeddings:
            p[k] -= 1
    exact = factorize_cols(num_embeddings, num_cores)
    if max(exact) <= max(p):  # no padding, no larger core
        p = exact
    return sorted(p, reverse=True)


def full_ranks(tt_ranks: int | Sequence[int], num_cores: int) -> list[int]:
    """``[1, r_1, ..., r_{d-1}, 1]`` from the ``d - 1`` inner ranks (or one int for all).

    Example::

        >>> full_ranks([8, 16], 3)
        [1, 8, 16, 1]
        >>> full_ranks(4, 3)
        [1, 4, 4, 1]
    """
    inner = [int(tt_ranks)] * (num_cores - 1) if isinstance(tt_ranks, int) else [int(r) for r in tt_ranks]
    if len(inner) != num_cores - 1:
        raise ValueError(f"tt_ranks must have num_cores - 1 = {num_cores - 1} entries, got {list(inner)}")
    if any(r < 1 for r in inner):
        raise ValueError(f"tt_ranks must be positive, got {inner}")
    return [1, *inner, 1]


def resolve_tt_shapes(
    num_embeddings: int,
    embedding_dim: int,
    tt_p_shapes: Sequence[int] | None,
    tt_q_shapes: Sequence[int] | None,
    tt_ranks: int | Sequence[int] | None,
) -> tuple[list[int], list[int], list[int]]:
    """Validate or derive ``(p, q, full_ranks)`` for a table.

    The number of cores comes from whichever of ``tt_p_shapes``, ``tt_q_shapes``
    and a list ``tt_ranks`` is given (they must agree), else it is 3.

    Args:
        num_embeddings (int): rows ``N``.
        embedding_dim (int): columns ``D``.
        tt_p_shapes (list[int], optional): row factors, ``prod >= N``; derived if None.
        tt_q_shapes (list[int], optional): column factors, ``prod == D``; derived if None.
        tt_ranks (int or list[int]): the ``d - 1`` inner TT ranks (an int: all equal).

    Returns:
        tuple: ``(p, q, ranks)`` with ``ranks`` of length ``d + 1``.

    Raises:
        ValueError: naming the constraint the given shapes break.

    Example::

        >>> resolve_tt_shapes(1000, 64, None, None, [8, 8])
        ([10, 10, 10], [4, 4, 4], [1, 8, 8, 1])
    """
    if num_embeddings < 1 or embedding_dim < 1:
        raise ValueError(f"num_embeddings ({num_embeddings}) and embedding_dim ({embedding_dim}) must be >= 1")
    if tt_ranks is None:
        raise ValueError("tt_ranks is required: the d - 1 inner TT ranks, e.g. tt_ranks=[16, 16] for 3 cores")
    counts = {
        name: len(v)
        for name, v in (("tt_p_shapes", tt_p_shapes), ("tt_q_shapes", tt_q_shapes))
        if v is not None
    }
    if not isinstance(tt_ranks, int):
        counts["tt_ranks (+1)"] = len(tt_ranks) + 1
    if len(set(counts.values())) > 1:
        raise ValueError(f"inconsistent number of TT cores: {counts}")
    d = next(iter(counts.values()), DEFAULT_NUM_CORES)
    if d < 2:
        raise ValueError(f"a TT table needs at least 2 cores, got {d} ({counts})")
    p = list(tt_p_shapes) if tt_p_shapes is not None else factorize_rows(num_embeddings, d)
    q = list(tt_q_shapes) if tt_q_shapes is not None else factorize_cols(embedding_dim, d)
    if any(int(x) < 1 for x in p + q):
        raise ValueError(f"tt_p_shapes {p} and tt_q_shapes {q} must be positive")
    if math.prod(p) < num_embeddings:
        raise ValueError(
            f"prod(tt_p_shapes) = prod({p}) = {math.prod(p)} must be >= num_embeddings = {num_embeddings} "
            "(note: the positional order is num_embeddings, embedding_dim, tt_p_shapes, tt_q_shapes, tt_ranks)"
        )
    if math.prod(q) != embedding_dim:
        raise ValueError(f"prod(tt_q_shapes) = prod({q}) = {math.prod(q)} must equal embedding_dim = {embedding_dim}")
    return [int(x) for x in p], [int(x) for x in q], full_ranks(tt_ranks, d)


def tt_num_parameters(p: Sequence[int], q: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of scalars in the cores: ``sum_k p_k * r_k * q_k * r_{k+1}``.

    Example::

        >>> tt_num_parameters([200, 220, 250], [4, 4, 4], [1, 32, 32, 1])
        958720
    """
    return sum(p[k] * ranks[k] * q[k] * ranks[k + 1] for k in range(len(p)))


def tt_flops_per_row(q: Sequence[int], ranks: Sequence[int]) -> int:
    """FLOPs to materialise one row left to right: ``sum_{k>=1} 2 Q_{<k} r_k q_k r_{k+1}``.

    Example::

        >>> tt_flops_per_row([4, 4, 4], [1, 32, 32, 1])
        36864
    """
    flops, q_lt = 0, q[0]
    for k in range(1, len(q)):
        flops += 2 * q_lt * ranks[k] * q[k] * ranks[k + 1]
        q_lt *= q[k]
    return flops


def internal_to_canonical(core: Tensor, r_in: int, q: int, r_out: int) -> Tensor:
    """``[p, r_in*q*r_out]`` (internal) -> ``[r_in, p, q, r_out]`` (canonical, a view).

    Example::

        >>> internal_to_canonical(torch.zeros(5, 2 * 3 * 4), 2, 3, 4).shape
        torch.Size([2, 5, 3, 4])
    """
    return core.view(core.shape[0], r_in, q, r_out).permute(1, 0, 2, 3)


def canonical_to_internal(core: Tensor) -> Tensor:
    """``[r_in, p, q, r_out]`` (canonical) -> ``[p, r_in*q*r_out]`` (internal, contiguous).

    Example::

        >>> canonical_to_internal(torch.zeros(2, 5, 3, 4)).shape
        torch.Size([5, 24])
    """
    return core.permute(1, 0, 2, 3).reshape(core.shape[1], -1).contiguous()
