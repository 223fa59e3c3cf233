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


def test_auto_grad_permutes_get_an_autograd_kernel_for_cuda():
    # fbgemm's CPU build registers permute_pooled_embs_auto_grad_split's autograd for CPU only; without an
    # AutogradCUDA kernel its backward on CUDA would return no gradient (a silent drop).
    fb.register_fbgemm_cuda_fallbacks("CUDA")
    for name in fb.AUTOGRAD_OPS:
        assert any(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"fbgemm::{name}", k) for k in ("Autograd", "AutogradCUDA")
        ), name


def test_permute_pooled_embs_fallback_is_differentiable():
    emb = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 2, 5, 6, 10])
    order = torch.tensor([2, 0, 3, 1])
    out = fb.permute_pooled_embs(emb, offsets, order, offsets, order)
    g = torch.randn_like(out)
    out.backward(g)
    cols = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in order.tolist()])
    expected = torch.zeros_like(emb)
    expected[:, cols] = g
    torch.testing.assert_close(emb.grad, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["permute_pooled_embs_auto_grad", "permute_pooled_embs_auto_grad_split"])
def test_cuda_permute_pooled_embs_gradients_match_cpu(name):
    fb.register_fbgemm_cuda_fallbacks("CUDA")
    op = getattr(torch.ops.fbgemm, name)
    offsets = torch.tensor([0, 2, 5, 6, 10])
    order = torch.tensor([2, 0, 3, 1])
    inv = torch.argsort(order)
    inv_offsets = torch.cat([torch.zeros(1, dtype=torch.long), (offsets[1:] - offsets[:-1])[order].cumsum(0)])
    emb = torch.randn(3, 10)
    g = torch.randn(3, 10)
    grads = []
    for device in ("cpu", "cuda"):
        x = emb.detach().to(device).requires_grad_(True)
        args = [t.to(device) for t in (offsets, order, inv_offsets, inv)]
        out = op(x, *args)
        out.backward(g.to(device))
        grads.append((out.detach().cpu(), x.grad.cpu()))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])
