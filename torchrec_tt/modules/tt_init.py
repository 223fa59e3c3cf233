"""Initialisation of TT cores (``weight_dist``), vectorised.

With ``R = prod(r_1 .. r_{d-1})`` the product of the inner ranks, an entry of
the materialised table is a sum of ``R`` products of ``d`` core entries, so for
i.i.d. zero-mean core entries of variance ``s^2`` it has mean 0 and variance
``R * s^(2d)``. The four distributions (``N = num_embeddings``, ``d`` cores):

* ``"uniform"``: core entries i.i.d. ``U(-b, b)``, ``b = N^(-1/(2d))``; table
  std ``sqrt(R / (N * 3^d))`` (grows with the ranks: the naive baseline).
* ``"normal"``: core entries i.i.d. ``N(0, s^2)``, ``s = (3N)^(-1/(2d))``; table
  std ``sqrt(R / (3N))``.
* ``"approx-uniform"``: core entries uniform with the variance chosen so that the
  table has the mean and std of DLRM's ``U(-1/sqrt(N), 1/sqrt(N))``: std
  ``1/sqrt(3N)``.
* ``"approx-normal"``: TT-Rec's sampled Gaussian: Gaussian core entries with the
  variance chosen so that the table entries have std ``1/sqrt(3N)`` (the same
  target), i.e. ``s^2 = (1 / (3N R))^(1/d)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["WEIGHT_DISTS", "init_tt_cores", "table_std"]

WEIGHT_DISTS = ("uniform", "normal", "approx-uniform", "approx-normal")


def _core_std(weight_dist: str, num_embeddings: int, ranks: Sequence[int]) -> float:
    d = len(ranks) - 1
    inner = math.prod(ranks[1:-1])
    if weight_dist == "uniform":
        return num_embeddings ** (-1.0 / (2 * d)) / math.sqrt(3.0)
    if weight_dist == "normal":
        return (3.0 * num_embeddings) ** (-1.0 / (2 * d))
    if weight_dist in ("approx-uniform", "approx-normal"):
        return (1.0 / (3.0 * num_embeddings * inner)) ** (1.0 / (2 * d))
    raise ValueError(f"weight_dist must be one of {WEIGHT_DISTS}, got {weight_dist!r}")


def table_std(weight_dist: str, num_embeddings: int, ranks: Sequence[int]) -> float:
    """Expected std of the materialised table's entries (their mean is 0).

    Example::

        >>> round(table_std("approx-normal", 1000, [1, 8, 8, 1]) ** 2 * 3000, 6)
        1.0
    """
    d = len(ranks) - 1
    return math.sqrt(math.prod(ranks[1:-1])) * _core_std(weight_dist, num_embeddings, ranks) ** d


@torch.no_grad()
def init_tt_cores(
    cores: Sequence[Tensor],
    weight_dist: str,
    num_embeddings: int,
    ranks: Sequence[int],
    generator: torch.Generator | None = None,
) -> None:
    """Fill ``cores`` in place according to ``weight_dist`` (module docstring).

    Args:
        cores (list[Tensor]): the TT cores (any layout; entries are i.i.d.).
        weight_dist (str): one of ``WEIGHT_DISTS``.
        num_embeddings (int): rows of the table.
        ranks (list[int]): ``d + 1`` TT ranks.
        generator (torch.Generator, optional): random source.

    Example::

        >>> cores = [torch.empty(10, 8), torch.empty(10, 64), torch.empty(10, 8)]
        >>> init_tt_cores(cores, "approx-normal", 1000, [1, 8, 8, 1])
    """
    std = _core_std(weight_dist, num_embeddings, ranks)
    for core in cores:
        if core.device.type == "meta":
            continue
        if weight_dist.endswith("uniform"):
            bound = std * math.sqrt(3.0)
            core.uniform_(-bound, bound, generator=generator)
        else:
            core.normal_(0.0, std, generator=generator)
