"""TTEmbeddingBag against nn.EmbeddingBag / torch.optim on the float64 dense oracle."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import dense_table, pooled
from torch import nn

from torchrec_tt import OptimType, TTEmbeddingBag


def _oracle_table(emb: TTEmbeddingBag, cores=None) -> torch.Tensor:
    cores = [c.detach().double() for c in emb.tt_cores] if cores is None else cores
    return dense_table(cores, emb.tt_p_shapes, emb.tt_q_shapes, emb.tt_ranks, emb.num_embeddings)


def _make(n=37, d=6, **kw):
    kw.setdefault("tt_ranks", [3, 2])
    kw.setdefault("dtype", torch.float64)
    return TTEmbeddingBag(n, d, kw.pop("tt_p_shapes", [4, 5, 2]), kw.pop("tt_q_shapes", [3, 1, 2]), **kw)


# ----------------------------------------------------------------------------- seed README
def test_seed_readme_examples_run_as_written():
    tt_emb = TTEmbeddingBag(
        num_embeddings=1000000,
        embedding_dim=64,
        tt_p_shapes=[120, 90, 110],
        tt_q_shapes=[4, 4, 4],
        tt_ranks=[12, 14],
        sparse=False,
        use_cache=False,
        weight_dist="uniform",
    )
    shapes = [tuple(c.shape) for c in tt_emb.canonical_cores()]
    assert shapes == [(1, 120, 4, 12), (12, 90, 4, 14), (14, 110, 4, 1)]
    embedding_sum = TTEmbeddingBag(10, 3, None, None, tt_ranks=[2, 2], sparse=False, use_cache=False)
    input = torch.LongTensor([1, 2, 4, 5, 4, 3, 2, 9])
    offsets = torch.LongTensor([0, 4])
    assert embedding_sum(input, offsets).shape == (2, 3)
    tt_emb = TTEmbeddingBag(
        num_embeddings=1000000,
        embedding_dim=64,
        tt_p_shapes=[120, 90, 110],
        tt_q_shapes=[4, 4, 4],
        tt_ranks=[12, 14],
        sparse=True,
        optimizer=OptimType.SGD,
        learning_rate=0.05,
        eps=1.0e-10,  # for ADAGRAD only
        use_cache=False,
    )
    tt_emb(input, offsets).sum().backward()
    assert all(c.grad is None for c in tt_emb.tt_cores)


# ----------------------------------------------------------------------------- forward conventions
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_matches_nn_embedding_bag(mode, index_dtype):
    emb = _make(mode=mode)
    ref = nn.EmbeddingBag.from_pretrained(_oracle_table(emb), mode=mode)
    ids = torch.tensor([0, 36, 36, 5, 7, 7, 1], dtype=index_dtype)
    offsets = torch.tensor([0, 3, 3, 6], dtype=index_dtype)  # includes an empty bag
    torch.testing.assert_close(emb(ids, offsets), ref(ids, offsets))
    # include_last_offset
    emb.include_last_offset = True
    ref.include_last_offset = True
    offsets_last = torch.tensor([0, 3, 3, 6, 7], dtype=index_dtype)
    torch.testing.assert_close(emb(ids, offsets_last), ref(ids, offsets_last))
    # 2-D input: fixed-length bags
    ids2 = torch.tensor([[1, 2, 3], [36, 36, 0]], dtype=index_dtype)
    torch.testing.assert_close(emb(ids2), ref(ids2))


def test_per_sample_weights_sum_matches_nn_embedding_bag_and_weighted_mean_matches_oracle():
    emb = _make()
    ids = torch.tensor([3, 3, 9, 20, 36])
    offsets = torch.tensor([0, 2, 2])
    w = torch.rand(5, dtype=torch.float64)
    ref = nn.EmbeddingBag.from_pretrained(_oracle_table(emb), mode="sum")
    torch.testing.assert_close(emb(ids, offsets, w), ref(ids, offsets, per_sample_weights=w))
    emb_mean = _make(mode="mean")
    full = torch.tensor([0, 2, 2, 5])
    torch.testing.assert_close(emb_mean(ids, offsets, w), pooled(_oracle_table(emb_mean), ids, full, w, 1))
    # 2-D input with 2-D weights
    torch.testing.assert_close(emb(ids[:4].view(2, 2), None, w[:4].view(2, 2)), ref(ids[:4].view(2, 2), per_sample_weights=w[:4].view(2, 2)))


@pytest.mark.parametrize("sparse", [False, True])
def test_per_sample_weights_gradient(sparse):
    emb = _make(mode="mean", sparse=sparse)
    ids = torch.tensor([3, 3, 9, 20, 36])
    offsets = torch.tensor([0, 2])
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, dtype=torch.float64)
    table = _oracle_table(emb)
    w_ref = w.detach().clone().requires_grad_(True)
    pooled(table, ids, torch.tensor([0, 2, 5]), w_ref, 1).backward(g)
    emb(ids, offsets, w).backward(g)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_bad_input_errors_name_the_table():
    emb = _make(name="user_id")
    with pytest.raises(IndexError, match=r"'user_id'.*indices\[1\]=37 is out of range"):
        emb(torch.tensor([0, 37]), torch.tensor([0]))
    with pytest.raises(IndexError, match=r"'user_id'.*indices\[0\]=-3"):
        emb(torch.tensor([-3]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"'user_id'.*non-decreasing"):
        emb(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"'user_id'.*offsets must be None"):
        emb(torch.tensor([[0, 1]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"'user_id'.*needs 1-D offsets"):
        emb(torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"tt_p_shapes": [2, 3, 4], "tt_q_shapes": [3, 1, 2]}, ValueError, r"prod\(tt_p_shapes\).*24.*>= num_embeddings = 37"),
        ({"tt_q_shapes": [3, 2, 2]}, ValueError, r"prod\(tt_q_shapes\).*12 must equal embedding_dim = 6"),
        ({"tt_ranks": [3]}, ValueError, "inconsistent number of TT cores"),
        ({"tt_ranks": [3, 0]}, ValueError, "positive"),
        ({"tt_ranks": None}, ValueError, "tt_ranks is required"),
        ({"mode": "median"}, ValueError, "mode must be .sum., .mean. or .max."),
        ({"weight_dist": "xavier"}, ValueError, "weight_dist"),
        ({"sparse": True, "optimizer": OptimType.ADAM}, NotImplementedError, "ADAM is not implemented"),
        ({"sparse": True, "optimizer": "adamw"}, ValueError, "unknown optimizer"),
    ],
)
def test_impossible_configurations_fail_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _make(name="t", **kwargs)


def test_single_core_is_rejected():
    with pytest.raises(ValueError, match="at least 2 cores"):
        TTEmbeddingBag(10, 4, [10], [4], [])


# ----------------------------------------------------------------------------- padding_idx
# Bags: a padding lookup among others, an empty bag, a bag of padding only, duplicates.
_PAD_IDS = torch.tensor([0, 36, 4, 4, 5, 7, 4, 1, 4])
_PAD_OFFSETS = torch.tensor([0, 4, 4, 6, 7])


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [4, -33])  # -33 is row 4 of 37
def test_padding_idx_forward_matches_nn_embedding_bag(mode, padding_idx):
    emb = _make(mode=mode, padding_idx=padding_idx)
    assert emb.padding_idx == 4 and "padding_idx=4" in repr(emb)
    ref = nn.EmbeddingBag.from_pretrained(_oracle_table(emb), mode=mode, padding_idx=4)
    torch.testing.assert_close(emb(_PAD_IDS, _PAD_OFFSETS), ref(_PAD_IDS, _PAD_OFFSETS))
    ids2 = torch.tensor([[4, 2, 3], [4, 4, 4], [36, 4, 0]], dtype=torch.int32)  # 2-D, int32
    torch.testing.assert_close(emb(ids2), ref(ids2))
    assert emb(torch.tensor([4, 4]), torch.tensor([0])).abs().max() == 0  # the TT row itself is not zero
    assert _oracle_table(emb)[4].abs().max() > 0


def test_padding_idx_per_sample_weights_and_their_gradient_match_nn_embedding_bag():
    emb = _make(padding_idx=4)
    ref = nn.EmbeddingBag.from_pretrained(_oracle_table(emb), mode="sum", padding_idx=4)
    w = torch.rand(_PAD_IDS.numel(), dtype=torch.float64, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_(True)
    g = torch.randn(_PAD_OFFSETS.numel(), 6, dtype=torch.float64)
    out = emb(_PAD_IDS, _PAD_OFFSETS, w)
    out_ref = ref(_PAD_IDS, _PAD_OFFSETS, per_sample_weights=w_ref)
    torch.testing.assert_close(out, out_ref)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert (w.grad[_PAD_IDS == 4] == 0).all()


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("sparse", [False, True])
def test_padding_idx_gets_no_gradient_and_training_matches_the_oracle(mode, sparse):
    lr = 0.3
    emb = _make(mode=mode, padding_idx=4, sparse=sparse, learning_rate=lr)
    params = [nn.Parameter(c.detach().clone()) for c in emb.tt_cores]
    g = torch.randn(_PAD_OFFSETS.numel(), 6, dtype=torch.float64)
    # oracle: autograd through the dense table with nn's padding_idx
    table = _oracle_table(emb, params)
    out_ref = torch.nn.functional.embedding_bag(_PAD_IDS, table, _PAD_OFFSETS, mode=mode, padding_idx=4)
    (out_ref * g).sum().backward()
    (emb(_PAD_IDS, _PAD_OFFSETS) * g).sum().backward()
    if sparse:  # fused SGD applied in the backward
        for c, prm in zip(emb.tt_cores, params, strict=True):
            torch.testing.assert_close(c.detach(), (prm - lr * prm.grad).detach(), rtol=1e-9, atol=1e-11)
    else:
        for c, prm in zip(emb.tt_cores, params, strict=True):
            torch.testing.assert_close(c.grad, prm.grad, rtol=1e-9, atol=1e-11)
    # a batch of padding lookups only: no core changes and no gradient
    emb2 = _make(mode=mode, padding_idx=4, sparse=sparse)
    before = [c.detach().clone() for c in emb2.tt_cores]
    emb2(torch.tensor([4, 4, 4]), torch.tensor([0, 1])).sum().backward()
    for c, b in zip(emb2.tt_cores, before, strict=True):
        assert torch.equal(c.detach(), b)
        assert c.grad is None or not c.grad.any()


def test_padding_idx_with_the_row_cache_matches_nn_embedding_bag():
    emb = _make(mode="mean", padding_idx=4, sparse=True, use_cache=True, cache_size=3)
    emb.train()
    with torch.no_grad():
        emb(_PAD_IDS, _PAD_OFFSETS)  # counts: 4 is the most frequent, then 7 / 5 / ...
    emb.cache_populate()
    assert 4 in emb.cache.cache_ids.tolist()
    ref = nn.EmbeddingBag.from_pretrained(emb.full_weight().detach(), mode="mean", padding_idx=4)
    emb.eval()
    with torch.no_grad():
        torch.testing.assert_close(emb(_PAD_IDS, _PAD_OFFSETS), ref(_PAD_IDS, _PAD_OFFSETS))


def test_padding_idx_bad_input_errors_name_the_table():
    with pytest.raises(ValueError, match=r"TTEmbeddingBag 'tbl': padding_idx must be in \[-37, 37\), got 37"):
        _make(padding_idx=37, name="tbl")
    emb = _make(mode="mean", padding_idx=4, include_last_offset=True, name="tbl")
    for offsets in (torch.tensor([0, 3, 5]), torch.tensor([0, 7, 3, 9]), torch.tensor([0])):  # 9 ids
        with pytest.raises(ValueError, match="TTEmbeddingBag 'tbl'.*offsets"):
            emb(_PAD_IDS, offsets)
    with pytest.raises(IndexError, match="TTEmbeddingBag 'tbl'"):
        emb(torch.tensor([4, 37]), torch.tensor([0, 2]))


# ----------------------------------------------------------------------------- mode="max"
@pytest.mark.parametrize("padding_idx", [None, 4])
def test_max_mode_forward_matches_nn_embedding_bag(padding_idx):
    emb = _make(mode="max", padding_idx=padding_idx)
    ref = nn.EmbeddingBag.from_pretrained(_oracle_table(emb), mode="max", padding_idx=padding_idx)
    torch.testing.assert_close(emb(_PAD_IDS, _PAD_OFFSETS), ref(_PAD_IDS, _PAD_OFFSETS))  # an empty bag
    ids2 = torch.tensor([[4, 2, 3], [36, 36, 0]], dtype=torch.int32)
    torch.testing.assert_close(emb(ids2), ref(ids2))
    emb.include_last_offset = ref.include_last_offset = True
    last = torch.cat([_PAD_OFFSETS, torch.tensor([_PAD_IDS.numel()])])
    torch.testing.assert_close(emb(_PAD_IDS, last), ref(_PAD_IDS, last))


@pytest.mark.parametrize("optimizer", [None, OptimType.EXACT_SGD, OptimType.EXACT_ADAGRAD])
def test_max_mode_training_matches_the_oracle(optimizer):
    lr, eps = 0.3, 1e-6
    sparse = optimizer is not None
    kw = {"optimizer": optimizer, "learning_rate": lr, "eps": eps} if sparse else {}
    emb = _make(mode="max", padding_idx=4, sparse=sparse, **kw)
    params = [nn.Parameter(c.detach().clone()) for c in emb.tt_cores]
    opt = torch.optim.Adagrad(params, lr=lr, eps=eps) if optimizer == OptimType.EXACT_ADAGRAD else torch.optim.SGD(params, lr=lr)
    g = torch.randn(_PAD_OFFSETS.numel(), 6, dtype=torch.float64)
    for _ in range(2):
        (emb(_PAD_IDS, _PAD_OFFSETS) * g).sum().backward()
        opt.zero_grad()
        out_ref = torch.nn.functional.embedding_bag(
            _PAD_IDS, _oracle_table(emb, params), _PAD_OFFSETS, mode="max", padding_idx=4
        )
        (out_ref * g).sum().backward()
        if not sparse:
            for c, prm in zip(emb.tt_cores, params, strict=True):
                torch.testing.assert_close(c.grad, prm.grad, rtol=1e-9, atol=1e-11)
            break
        opt.step()
        for c, prm in zip(emb.tt_cores, params, strict=True):
            torch.testing.assert_close(c.detach(), prm.detach(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("sparse", [False, True])
def test_max_mode_ties_share_the_gradient(sparse):
    # a bag of one id twice: both lookups hold the max; the row gets the bag's gradient once
    emb = _make(mode="max", sparse=sparse, learning_rate=1.0)
    params = [nn.Parameter(c.detach().clone()) for c in emb.tt_cores]
    ids, offsets = torch.tensor([7, 7, 3]), torch.tensor([0, 2])
    g = torch.randn(2, 6, dtype=torch.float64)
    (emb(ids, offsets) * g).sum().backward()
    table = _oracle_table(emb, params)
    ((torch.stack([table[7], table[3]])) * g).sum().backward()
    for c, prm in zip(emb.tt_cores, params, strict=True):
        got = (prm.detach() - c.detach()) if sparse else c.grad  # fused SGD, lr = 1
        torch.testing.assert_close(got, prm.grad, rtol=1e-9, atol=1e-11)


def test_max_mode_bad_input_errors_name_the_table():
    emb = _make(mode="max", name="tbl")
    with pytest.raises(ValueError, match="TTEmbeddingBag 'tbl': per_sample_weights are not supported with mode='max'"):
        emb(_PAD_IDS, _PAD_OFFSETS, torch.ones(_PAD_IDS.numel(), dtype=torch.float64))
    emb.include_last_offset = True
    for offsets in (torch.tensor([0, 3, 5]), torch.tensor([1, 9]), torch.tensor([0, 7, 3, 9])):
        with pytest.raises(ValueError, match="TTEmbeddingBag 'tbl': offsets must start at 0"):
            emb(_PAD_IDS, offsets)
    with pytest.raises(IndexError, match="TTEmbeddingBag 'tbl'"):
        emb(torch.tensor([4, 37]), torch.tensor([0, 2]))
    with pytest.raises(NotImplementedError, match="TTEmbeddingBag 'c': mode='max' does not support use_cache"):
        _make(mode="max", sparse=True, use_cache=True, cache_size=2, name="c")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_cuda_padding_idx_and_max_mode_match_cpu_without_host_sync(mode):
    def run(device, no_sync):
        emb = _make(mode=mode, padding_idx=4, sparse=True, learning_rate=0.2).to(device)
        outs = []
        for _ in range(2):
            ids, offsets = _PAD_IDS.to(device), _PAD_OFFSETS.to(device)
            g = torch.linspace(-1, 1, _PAD_OFFSETS.numel() * 6, dtype=torch.float64).view(-1, 6).to(device)
            if no_sync:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = emb(ids, offsets)
                out.backward(g)
            finally:
                if no_sync:
                    torch.cuda.set_sync_debug_mode("default")
            outs.append(out.detach().cpu())
        return outs, [c.detach().cpu() for c in emb.tt_cores]

    torch.manual_seed(3)
    cpu_outs, cpu_cores = run("cpu", False)
    torch.manual_seed(3)
    cuda_outs, cuda_cores = run("cuda", True)
    for a, b in zip(cpu_outs + cpu_cores, cuda_outs + cuda_cores, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("n,d,cores", [(10, 3, 3), (1000, 64, 3), (1_000_003, 128, 3), (97, 16, 2), (5000, 32, 4), (12345, 10, 5)])
def test_automatic_factorisation(n, d, cores):
    emb = TTEmbeddingBag(n, d, tt_ranks=[2] * (cores - 1), device="meta")
    p, q = emb.tt_p_shapes, emb.tt_q_shapes
    assert len(p) == len(q) == cores
    assert math.prod(p) >= n and math.prod(q) == d
    assert emb.num_padded_rows == math.prod(p) - n
    assert emb.num_padded_rows < n * (2 ** (1 / cores) - 1) + max(p) ** (cores - 1), "padding must stay small"
    assert max(p) <= math.ceil(n ** (1 / cores)) + 1


def test_meta_device_construction_and_sizes():
    emb = TTEmbeddingBag(11_000_000, 64, [200, 220, 250], [4, 4, 4], [32, 32], device="meta")
    assert all(c.is_meta for c in emb.tt_cores)
    assert sum(c.numel() for c in emb.tt_cores) == 200 * 4 * 32 + 220 * 32 * 4 * 32 + 250 * 32 * 4
    assert emb.compression_ratio > 700


# ----------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("dist", ["uniform", "normal", "approx-uniform", "approx-normal"])
def test_weight_dist_table_moments(dist):
    n, ranks = 4000, [8, 8]
    emb = TTEmbeddingBag(n, 16, [20, 20, 10], [4, 2, 2], ranks, weight_dist=dist, dtype=torch.float64)
    table = _oracle_table(emb)
    r = math.prod(ranks)
    expected_std = {
        "uniform": math.sqrt(r / (n * 27)),  # core entries U(-b, b), b = N^(-1/6): var b^2/3
        "normal": math.sqrt(r / (3 * n)),
        "approx-uniform": 1 / math.sqrt(3 * n),
        "approx-normal": 1 / math.sqrt(3 * n),
    }[dist]
    assert abs(table.mean().item()) < 0.1 * expected_std
    assert table.std().item() == pytest.approx(expected_std, rel=0.15)


def test_approx_normal_cores_are_gaussian_and_reset_parameters_is_seeded():
    emb = TTEmbeddingBag(10_000, 16, tt_ranks=[16, 16])
    gen = torch.Generator().manual_seed(3)
    emb.reset_parameters(gen)
    first = [c.detach().clone() for c in emb.tt_cores]
    emb.reset_parameters(torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, emb.tt_cores, strict=True))
    core = first[1].flatten()
    kurtosis = ((core - core.mean()) ** 4).mean() / core.var() ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.2)


# ----------------------------------------------------------------------------- training
def _batches(n, steps=4):
    gen = torch.Generator().manual_seed(1)
    for s in range(steps):
        lengths = torch.randint(0, 5, (6,), generator=gen)
        lengths[s % 6] = 0
        ids = torch.randint(0, n, (int(lengths.sum()),), generator=gen)
        ids[: min(3, ids.numel())] = n - 1 - s  # duplicates within and across bags
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        yield ids, offsets, torch.rand(ids.numel(), dtype=torch.float64, generator=gen), torch.randn(6, 6, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_SGD, OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_fused_training_matches_torch_optim_on_dense_oracle(optimizer, mode):
    lr, eps = 0.3, 1e-6
    emb = _make(sparse=True, optimizer=optimizer, learning_rate=lr, eps=eps, mode=mode, tt_p_shapes=[10, 2, 2], tt_ranks=[3, 2])
    params = [nn.Parameter(c.detach().clone()) for c in emb.tt_cores]
    opt = {
        OptimType.EXACT_SGD: lambda: torch.optim.SGD(params, lr=lr),
        OptimType.EXACT_ADAGRAD: lambda: torch.optim.Adagrad(params, lr=lr, eps=eps),
        OptimType.EXACT_ROWWISE_ADAGRAD: lambda: None,
    }[optimizer]()
    row_state = [torch.zeros(p.shape[0], dtype=torch.float64) for p in params]
    for ids, offsets, w, target in _batches(37):
        # library: fused update inside backward
        (emb(ids, offsets[:-1], w) * target).sum().backward()
        # oracle: autograd through the dense table, then the torch optimizer
        full = torch.cat([offsets[:-1], torch.tensor([ids.numel()])])
        loss = (pooled(_oracle_table(emb, params), ids, full, w, 1 if mode == "mean" else 0) * target).sum()
        for prm in params:
            prm.grad = None
        loss.backward()
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                for prm, s in zip(params, row_state, strict=True):
                    s += (prm.grad**2).mean(dim=1)
                    prm -= lr * prm.grad / (s.sqrt() + eps)[:, None]
        for c, prm in zip(emb.tt_cores, params, strict=True):
            torch.testing.assert_close(c.detach(), prm.detach(), rtol=1e-9, atol=1e-11)
    if optimizer == OptimType.EXACT_ADAGRAD:
        for s, prm in zip(emb.optimizer_states(), params, strict=True):
            torch.testing.assert_close(s, opt.state[prm]["sum"])


def test_dense_gradients_work_with_any_torch_optimizer():
    emb = _make(sparse=False)
    params = [nn.Parameter(c.detach().clone()) for c in emb.tt_cores]
    opt_tt = torch.optim.Adam(emb.parameters(), lr=0.01)
    opt_ref = torch.optim.Adam(params, lr=0.01)
    for ids, offsets, w, target in _batches(37, steps=3):
        opt_tt.zero_grad()
        opt_ref.zero_grad()
        (emb(ids, offsets[:-1], w) * target).sum().backward()
        full = torch.cat([offsets[:-1], torch.tensor([ids.numel()])])
        (pooled(_oracle_table(emb, params), ids, full, w, 0) * target).sum().backward()
        for c, prm in zip(emb.tt_cores, params, strict=True):
            torch.testing.assert_close(c.grad, prm.grad, rtol=1e-9, atol=1e-11)
        opt_tt.step()
        opt_ref.step()
    for c, prm in zip(emb.tt_cores, params, strict=True):
        torch.testing.assert_close(c.detach(), prm.detach(), rtol=1e-9, atol=1e-11)


def test_set_learning_rate_changes_the_fused_step():
    emb = _make(sparse=True, learning_rate=1.0)
    before = [c.detach().clone() for c in emb.tt_cores]
    ids, offsets = torch.tensor([3]), torch.tensor([0])
    emb.set_learning_rate(0.0)
    emb(ids, offsets).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, emb.tt_cores, strict=True))
    emb.set_learning_rate(0.5)
    emb(ids, offsets).sum().backward()
    assert not all(torch.equal(a, b) for a, b in zip(before, emb.tt_cores, strict=True))


def test_two_lookups_before_one_backward_are_refused_not_silently_wrong():
    emb = _make(sparse=True)
    ids, offsets = torch.tensor([3, 4]), torch.tensor([0])
    loss = emb(ids, offsets).sum() + emb(ids, offsets).sum()
    with pytest.raises(RuntimeError, match="cores changed between this forward and its backward"):
        loss.backward()


def test_sparse_table_in_no_grad_mode_is_a_plain_lookup():
    emb = _make(sparse=True)
    with torch.no_grad():
        out = emb(torch.tensor([1, 2]), torch.tensor([0]))
    torch.testing.assert_close(out, _oracle_table(emb)[[1, 2]].sum(0, keepdim=True))


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("optimizer", [OptimType.SGD, OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD])
def test_state_dict_round_trip_includes_fused_optimizer_state(optimizer, tmp_path):
    emb = _make(sparse=True, optimizer=optimizer, learning_rate=0.2)
    batches = list(_batches(37, steps=3))
    for ids, offsets, w, target in batches[:2]:
        (emb(ids, offsets[:-1], w) * target).sum().backward()
    torch.save(emb.state_dict(), tmp_path / "tt.pt")
    keys = set(emb.state_dict())
    assert {"tt_cores.0", "tt_cores.1", "tt_cores.2"} <= keys
    assert (len(keys) == 6) == (optimizer != OptimType.SGD)
    clone = _make(sparse=True, optimizer=optimizer, learning_rate=0.2)
    clone.load_state_dict(torch.load(tmp_path / "tt.pt"))
    ids, offsets, w, target = batches[2]
    for m in (emb, clone):
        (m(ids, offsets[:-1], w) * target).sum().backward()
    for a, b in zip(emb.state_dict().values(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_mismatched_checkpoint_is_refused_and_nothing_is_loaded():
    src = _make(sparse=True, optimizer=OptimType.EXACT_ADAGRAD, tt_ranks=[3, 3])
    dst = _make(sparse=True, optimizer=OptimType.EXACT_ADAGRAD, tt_ranks=[3, 2], name="item")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    state = src.state_dict()
    state["tt_cores.0"] = dst.tt_cores[0].detach() + 1  # the first core would fit
    with pytest.raises(RuntimeError, match=r"'item'.*tt_cores.1 has shape \(5, 9\).*nothing was loaded"):
        dst.load_state_dict(state)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_canonical_cores_round_trip():
    emb = _make()
    other = _make()
    other.load_canonical_cores([c.clone() for c in emb.canonical_cores()])
    assert all(torch.equal(a, b) for a, b in zip(emb.tt_cores, other.tt_cores, strict=True))
    with pytest.raises(ValueError, match="do not match"):
        other.load_canonical_cores([c.clone() for c in emb.canonical_cores()][:2])


# ----------------------------------------------------------------------------- dense conversion
def test_full_weight_matches_oracle_and_is_differentiable():
    emb = _make()
    w = emb.full_weight()
    torch.testing.assert_close(w, _oracle_table(emb))
    w.sum().backward()
    assert all(c.grad is not None for c in emb.tt_cores)


def test_from_dense_recovers_a_tt_table_exactly_and_reports_error():
    src = _make(n=40, tt_ranks=[3, 2])  # no padding rows: zero padding could raise the TT rank
    table = _oracle_table(src)
    emb = TTEmbeddingBag.from_dense(table, tt_ranks=[3, 2], tt_p_shapes=[4, 5, 2], tt_q_shapes=[3, 1, 2])
    assert emb.tt_svd_relative_error < 1e-10
    torch.testing.assert_close(_oracle_table(emb), table)
    noisy = torch.randn(200, 8, dtype=torch.float64)
    errors = [TTEmbeddingBag.from_dense(noisy, tt_ranks=[r], tt_p_shapes=[10, 20], tt_q_shapes=[2, 4]).tt_svd_relative_error for r in (2, 8, 40)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10
    # the reported error is the real one
    emb = TTEmbeddingBag.from_dense(noisy, tt_ranks=[8], tt_p_shapes=[10, 20], tt_q_shapes=[2, 4])
    real = ((_oracle_table(emb) - noisy).norm() / noisy.norm()).item()
    assert emb.tt_svd_relative_error == pytest.approx(real, rel=1e-9)


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_forward_and_backward():
    emb = _make(dtype=torch.float32)
    compiled = torch.compile(emb, fullgraph=True, backend="aot_eager")
    ids, offsets = torch.tensor([1, 2, 36, 36]), torch.tensor([0, 1])
    out = compiled(ids, offsets)
    torch.testing.assert_close(out, emb(ids, offsets))
    out.sum().backward()
    grads = [c.grad.clone() for c in emb.tt_cores]
    emb.zero_grad()
    emb(ids, offsets).sum().backward()
    for g, c in zip(grads, emb.tt_cores, strict=True):
        torch.testing.assert_close(g, c.grad)


def test_torch_compile_inductor_fullgraph_forward():
    emb = _make(dtype=torch.float32)
    compiled = torch.compile(emb, fullgraph=True)
    ids, offsets = torch.tensor([1, 2, 36, 36]), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, offsets), emb(ids, offsets))


@pytest.mark.skipif(
    torch.__version__ < "2.12",
    reason="torch 2.11's AOTAutograd writes parameters updated in the backward back under grad mode and raises "
    "'a leaf Variable that requires grad is being used in an in-place operation' (fixed in torch 2.12)",
)
def test_torch_compile_fullgraph_sparse_training_matches_eager():
    eager = _make(sparse=True, optimizer=OptimType.EXACT_ADAGRAD, dtype=torch.float32)
    compiled_table = _make(sparse=True, optimizer=OptimType.EXACT_ADAGRAD, dtype=torch.float32)
    compiled_table.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_table, fullgraph=True, backend="aot_eager")
    for ids, offsets, _, target in _batches(37, steps=2):
        (compiled(ids, offsets[:-1]) * target.float()).sum().backward()
        (eager(ids, offsets[:-1]) * target.float()).sum().backward()
    for a, b in zip(eager.state_dict().values(), compiled_table.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
