"""TT-SVD: compress a dense embedding table into TT cores (Oseledets 2011).

The table ``W`` (``N x D``, rows padded with zeros to ``prod(p)``) is viewed as
a ``d``-way tensor with mode ``k`` of size ``p_k * q_k`` (row digit ``i_k`` and
column digit ``j_k`` together); sweeping left to right, each unfolding is
factored by a truncated SVD that keeps at most ``r_k`` singular values. The
result is quasi-optimal: its error is at most ``sqrt(d - 1)`` times the best
rank-``r`` TT approximation's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["tt_svd"]


@torch.no_grad()
def tt_svd(weight: Tensor, p: Sequence[int], q: Sequence[int], ranks: Sequence[int]) -> list[Tensor]:
    """Truncated TT-SVD of a dense table, cores in the canonical layout.

    Args:
        weight (Tensor): ``(N, D)`` table with ``N <= prod(p)`` and ``D == prod(q)``.
        p (list[int]): row factorisation.
        q (list[int]): column factorisation.
        ranks (list[int]): ``d + 1`` maximal TT ranks; where the data has lower rank
            the core is padded with zeros to keep the requested shape.

    Returns:
        list[Tensor]: cores ``[r_{k-1}, p_k, q_k, r_k]`` in ``weight``'s dtype
        (computed in float64).

    Example::

        >>> w = torch.randn(12, 4, dtype=torch.float64)
        >>> cores = tt_svd(w, [3, 4], [2, 2], [1, 8, 1])
        >>> [tuple(c.shape) for c in cores]
        [(1, 3, 2, 8), (8, 4, 2, 1)]
    """
    n, dim = weight.shape
    d = len(p)
    if n > math.prod(p) or dim != math.prod(q) or len(q) != d or len(ranks) != d + 1:
        raise ValueError(f"tt_svd: table {tuple(weight.shape)} does not fit p={list(p)}, q={list(q)}, ranks={list(ranks)}")
    w = torch.zeros(math.prod(p), dim, dtype=torch.float64, device=weight.device)
    w[:n] = weight.to(torch.float64)
    # (p_1..p_d, q_1..q_d) -> (p_1, q_1, p_2, q_2, ...)
    x = w.reshape(*p, *q).permute(*[i for k in range(d) for i in (k, d + k)]).contiguous()
    cores = []
    rank_in = 1
    rest = x.reshape(-1)
    for k in range(d - 1):
        mat = rest.reshape(rank_in * p[k] * q[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        keep = min(ranks[k + 1], s.numel())
        core = torch.zeros(rank_in, p[k], q[k], ranks[k + 1], dtype=torch.float64, device=w.device)
        core[..., :keep] = u[:, :keep].reshape(rank_in, p[k], q[k], keep)
        cores.append(core)
        rest = torch.zeros(ranks[k + 1], vh.shape[1], dtype=torch.float64, device=w.device)
        rest[:keep] = s[:keep, None] * vh[:keep]
        rank_in = ranks[k + 1]
    cores.append(rest.reshape(rank_in, p[d - 1], q[d - 1], 1))
    return [c.to(weight.dtype if weight.is_floating_point() else torch.float32) for c in cores]
