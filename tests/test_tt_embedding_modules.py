"""TTEmbeddingBagConfig / TTEmbeddingBagCollection (unsharded) against float64 oracles and torchrec."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from oracles import dense_table, pooled

torchrec = pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType  # noqa: E402

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig  # noqa: E402
from torchrec_tt.modules import align_config_for_row_wise  # noqa: E402


def _tables():
    return [
        TTEmbeddingBagConfig(name="t0", num_embeddings=50, embedding_dim=6, feature_names=["f0", "f1"],
                             tt_p_shapes=[5, 2, 5], tt_q_shapes=[3, 2, 1], tt_ranks=[2, 3]),
        TTEmbeddingBagConfig(name="t1", num_embeddings=33, embedding_dim=6, feature_names=["f1", "f2"],
                             pooling=PoolingType.MEAN, tt_ranks=4),
        EmbeddingBagConfig(name="t2", num_embeddings=20, embedding_dim=6, feature_names=["f3"]),
    ]


ROWS = {"f0": 50, "f1": 33, "f2": 33, "f3": 20}


def _kjt(batch=5, weighted=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    values, lengths, weights = [], [], []
    for n in ROWS.values():
        for _ in range(batch):
            length = int(torch.randint(0, 4, (1,), generator=g))
            values += torch.randint(0, n, (length,), generator=g).tolist()
            weights += (torch.rand(length, generator=g) + 0.5).tolist()
            lengths.append(length)
    return KeyedJaggedTensor(keys=list(ROWS), values=torch.tensor(values), lengths=torch.tensor(lengths),
                             weights=torch.tensor(weights) if weighted else None)


def _oracle(ebc, kjt, weighted):
    """float64 dense tables + plain pooling, keyed like torchrec."""
    out = {}
    feats = kjt.to_dict()
    shared = {"f1"}
    for cfg in ebc.embedding_bag_configs():
        bag = ebc.embedding_bags[cfg.name]
        if hasattr(bag, "tt_cores"):
            w = dense_table([c.detach().double() for c in bag.tt_cores], bag.tt_p_shapes, bag.tt_q_shapes,
                            bag.tt_ranks, bag.num_embeddings)
        else:
            w = bag.weight.detach().double()
        mode = 1 if cfg.pooling == PoolingType.MEAN else 0
        for f in cfg.feature_names:
            jt = feats[f]
            off = torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)])
            key = f"{f}@{cfg.name}" if f in shared else f
            out[key] = pooled(w, jt.values(), off, jt.weights() if weighted else None, mode)
    return out


@pytest.mark.parametrize("weighted", [False, True])
def test_forward_matches_float64_oracle(weighted):
    ebc = TTEmbeddingBagCollection(_tables(), is_weighted=weighted)
    kjt = _kjt(weighted=weighted)
    kt = ebc(kjt)
    assert kt.keys() == ["f0", "f1@t0", "f1@t1", "f2", "f3"]
    assert kt.values().dtype == torch.float32 and kt.values().shape == (5, 30)
    want = _oracle(ebc, kjt, weighted)
    for key, value in kt.to_dict().items():
        torch.testing.assert_close(value.double(), want[key], atol=1e-6, rtol=1e-5)


def test_gradients_match_autograd_through_dense_oracle():
    ebc = TTEmbeddingBagCollection(_tables(), is_weighted=True)
    kjt = _kjt(weighted=True, seed=3)
    coef = torch.randn(5, 30)
    (ebc(kjt).values() * coef).sum().backward()
    cores = {n: [c.detach().double().requires_grad_() for c in ebc.embedding_bags[n].tt_cores] for n in ("t0", "t1")}
    w2 = ebc.embedding_bags["t2"].weight.detach().double().requires_grad_()
    feats = kjt.to_dict()
    total = 0
    cols = iter(coef.double().split(6, dim=1))
    for cfg in ebc.embedding_bag_configs():
        bag = ebc.embedding_bags[cfg.name]
        w = dense_table(cores[cfg.name], bag.tt_p_shapes, bag.tt_q_shapes, bag.tt_ranks, bag.num_embeddings) \
            if cfg.name in cores else w2
        for f in cfg.feature_names:
            jt = feats[f]
            off = torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)])
            total = total + (pooled(w, jt.values(), off, jt.weights(), int(cfg.pooling == PoolingType.MEAN)) * next(cols)).sum()
    total.backward()
    for n in ("t0", "t1"):
        for mine, ref in zip(ebc.embedding_bags[n].tt_cores, cores[n], strict=True):
            torch.testing.assert_close(mine.grad.double(), ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ebc.embedding_bags["t2"].weight.grad.double(), w2.grad, atol=1e-6, rtol=1e-5)


def test_plain_tables_match_stock_embedding_bag_collection():
    cfgs = [EmbeddingBagConfig(name="a", num_embeddings=20, embedding_dim=4, feature_names=["f3", "f0"]),
            EmbeddingBagConfig(name="b", num_embeddings=20, embedding_dim=4, feature_names=["f0"], pooling=PoolingType.MEAN)]
    stock = EmbeddingBagCollection(cfgs, is_weighted=False)
    mine = TTEmbeddingBagCollection(cfgs)
    mine.load_state_dict(stock.state_dict())
    kjt = KeyedJaggedTensor(keys=["f0", "f3"], values=torch.tensor([1, 2, 3, 4, 5, 6, 7]), lengths=torch.tensor([2, 0, 1, 1, 3, 0]))
    a, b = stock(kjt), mine(kjt)
    assert a.keys() == b.keys() and a.length_per_key() == b.length_per_key()
    torch.testing.assert_close(a.values(), b.values())


def test_config_derives_shapes_and_validates():
    cfg = TTEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"], tt_ranks=[8, 8])
    assert (cfg.tt_p_shapes, cfg.tt_q_shapes, cfg.tt_ranks) == ([10, 10, 10], [4, 2, 2], [8, 8])
    assert cfg.num_tt_parameters() < 1000 * 16
    with pytest.raises(ValueError, match="TTEmbeddingBagConfig 't'.*prod\\(tt_q_shapes\\)"):
        TTEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=16, feature_names=["f"], tt_q_shapes=[3, 5])
    with pytest.raises(ValueError, match="'t'.*weight_dist"):
        TTEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["f"], weight_dist="bogus")
    aligned = align_config_for_row_wise(
        TTEmbeddingBagConfig(name="t", num_embeddings=999, embedding_dim=8, feature_names=["f"], tt_p_shapes=[10, 10, 10]), 4)
    assert aligned.num_embeddings == 1200 and aligned.tt_p_shapes == [12, 10, 10]
    assert (aligned.num_embeddings // 4) % 100 == 0


def test_collection_rejects_bad_configs():
    with pytest.raises(ValueError, match="duplicate table name 't0'"):
        TTEmbeddingBagCollection(_tables()[:1] * 2)
    with pytest.raises(KeyError, match="f3"):
        TTEmbeddingBagCollection(_tables())(KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([1]),
                                                               lengths=torch.tensor([1, 0, 0])))


def test_meta_device_and_reset_parameters():
    ebc = TTEmbeddingBagCollection(_tables(), device="meta")
    assert all(p.is_meta for p in ebc.parameters())
    ebc.reset_parameters()  # no-op on meta
    cpu = TTEmbeddingBagCollection(_tables())
    before = [p.detach().clone() for p in cpu.parameters()]
    cpu.reset_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(before, cpu.parameters(), strict=True))


@pytest.mark.parametrize("model", ["dlrm", "dlrm_dcn"])
def test_dlrm_accepts_the_collection_unchanged(model):
    from torchrec.models.dlrm import DLRM, DLRM_DCN

    tables = _tables()
    tables[1].feature_names = ["f2"]  # DLRM (stock too) needs unshared feature names
    ebc = TTEmbeddingBagCollection(tables)
    kwargs = {"embedding_bag_collection": ebc, "dense_in_features": 4, "dense_arch_layer_sizes": [8, 6],
              "over_arch_layer_sizes": [5, 1]}
    net = DLRM(**kwargs) if model == "dlrm" else DLRM_DCN(**kwargs, dcn_num_layers=2, dcn_low_rank_dim=4)
    out = net(torch.rand(5, 4), _kjt())
    assert out.shape == (5, 1)
    out.sum().backward()
    assert all(c.grad is not None for c in ebc.embedding_bags["t0"].tt_cores)


def test_import_torchrec_tt_does_not_import_torchrec():
    code = "import sys, torchrec_tt; assert 'torchrec' not in sys.modules; torchrec_tt.TTEmbeddingBagConfig; assert 'torchrec' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
