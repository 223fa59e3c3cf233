"""Independent float64 oracles: dense materialisation by einsum + plain PyTorch pooling.

Nothing here calls torchrec_tt; tests compare the library against these.
"""

from __future__ import annotations

import math
import string

import torch
from torch import Tensor


def dense_table(cores: list[Tensor], p: list[int], q: list[int], ranks: list[int], num_embeddings: int) -> Tensor:
    """W[i, j] from cores in the internal layout [p_k, r_k*q_k*r_{k+1}], by one einsum."""
    d = len(cores)
    letters = iter(string.ascii_letters)
    row, col, rank = [next(letters) for _ in range(d)], [next(letters) for _ in range(d)], [next(letters) for _ in range(d + 1)]
    terms = [f"{row[k]}{rank[k]}{col[k]}{rank[k + 1]}" for k in range(d)]
    spec = ",".join(terms) + "->" + "".join(row) + "".join(col) + rank[0] + rank[d]
    views = [c.reshape(p[k], ranks[k], q[k], ranks[k + 1]) for k, c in enumerate(cores)]
    w = torch.einsum(spec, *views).reshape(math.prod(p), math.prod(q))
    return w[:num_embeddings]


def pooled(weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, mode: int) -> Tensor:
    """Bags of rows of ``weight``: offsets has B + 1 entries; mode 0 sum, 1 mean (weighted sum / length)."""
    out = []
    offs = offsets.tolist()
    for b in range(len(offs) - 1):
        lo, hi = offs[b], offs[b + 1]
        rows = weight[indices[lo:hi].long()]
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[lo:hi, None].to(rows.dtype)
        acc = rows.sum(0) if hi > lo else weight.new_zeros(weight.shape[1])
        if mode == 1 and hi > lo:
            acc = acc / (hi - lo)
        out.append(acc)
    return torch.stack(out) if out else weight.new_zeros(0, weight.shape[1])


def random_cores(p, q, ranks, dtype=torch.float64, device="cpu", scale=0.5):
    return [scale * torch.randn(p[k], ranks[k] * q[k] * ranks[k + 1], dtype=dtype, device=device) for k in range(len(p))]


def random_bags(num_embeddings: int, lengths: list[int], index_dtype=torch.int64, with_duplicates=True):
    """Ids for bags of the given lengths (some repeated within and across bags) and B + 1 offsets."""
    total = sum(lengths)
    pool = torch.randint(0, num_embeddings, (max(total // 2, 1),)) if with_duplicates else None
    ids = pool[torch.randint(0, pool.numel(), (total,))] if with_duplicates else torch.randint(0, num_embeddings, (total,))
    if total:
        ids[0] = num_embeddings - 1  # the last valid row is always looked up
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return ids.to(index_dtype), offsets.to(index_dtype)


# Shapes that break naive kernels: (p, q, ranks, num_embeddings)
SHAPES = [
    ([3, 4], [2, 3], [1, 5, 1], 11),  # 2 cores, N < prod(p)
    ([5, 2, 3], [2, 1, 3], [1, 2, 3, 1], 30),  # 3 cores, q_k = 1
    ([40, 3, 2], [2, 2, 2], [1, 2, 2, 1], 200),  # p_0 = 40 > r*q*r = 4 (FBTT left rows un-updated)
    ([2, 3, 2, 3], [2, 1, 2, 2], [1, 3, 2, 2, 1], 35),  # 4 cores
    ([2, 2, 3, 2, 2], [1, 2, 2, 1, 2], [1, 2, 3, 2, 2, 1], 48),  # 5 cores
]
