"""The pure-PyTorch fbgemm fallbacks equal fbgemm's CPU kernels (run here on CPU tensors)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchrec")
import fbgemm_gpu  # noqa: E402,F401

from torchrec_tt.distributed import fbgemm_cuda_fallback as fb  # noqa: E402


def _sparse(num_features, batch, max_len, high, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_features, batch), generator=g)
    values = torch.randint(0, high, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g)
    return lengths, values, weights


@pytest.mark.parametrize("seed", range(4))
def test_fallbacks_match_fbgemm_cpu(seed):
    lengths, values, weights = _sparse(5, 3, 4, 50, seed)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed)).int()
    for got, want in zip(fb.permute_2D_sparse_data(perm, lengths, values, weights),
                         torch.ops.fbgemm.permute_2D_sparse_data(perm, lengths, values, weights), strict=True):
        torch.testing.assert_close(got, want)
    flat = lengths.view(-1)
    perm1 = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed)).int()
    for got, want in zip(fb.permute_1D_sparse_data(perm1, flat, values, weights),
                         torch.ops.fbgemm.permute_1D_sparse_data(perm1, flat, values, weights), strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(fb.asynchronous_complete_cumsum(flat), torch.ops.fbgemm.asynchronous_complete_cumsum(flat))
    block_sizes = torch.tensor([13, 25, 7, 50, 9])
    for keep in (False, True):
        got = fb.block_bucketize_sparse_features(flat, values, True, True, block_sizes, 4, weights, keep_orig_idx=keep)
        want = torch.ops.fbgemm.block_bucketize_sparse_features(flat, values, True, True, block_sizes, 4, weights,
                                                                keep_orig_idx=keep)
        for g_, w_ in zip(got, want, strict=True):
            torch.testing.assert_close(g_, w_)
    emb = torch.randn(3, 10)
    offsets = torch.tensor([0, 2, 5, 6, 10])
    order = torch.tensor([2, 0, 3, 1])
    inv = torch.argsort(order)
    inv_offsets = torch.cat([torch.zeros(1, dtype=torch.long), (offsets[1:] - offsets[:-1])[order].cumsum(0)])
    torch.testing.assert_close(fb.permute_pooled_embs(emb, offsets, order, inv_offsets, inv),
                               torch.ops.fbgemm.permute_pooled_embs(emb, offsets, order, inv_offsets, inv))


def test_register_only_fills_missing_kernels():
    first = fb.register_fbgemm_cuda_fallbacks("CUDA")
    assert "permute_2D_sparse_data" in first or torch._C._dispatch_has_kernel_for_dispatch_key(
        "fbgemm::permute_2D_sparse_data", "CUDA")
    assert fb.register_fbgemm_cuda_fallbacks("CUDA") == []  # idempotent, never overrides
