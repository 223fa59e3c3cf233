"""Planner plugin on meta tensors: Criteo-Kaggle-sized model with TT tables at their real size."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection, EmbeddingBagConfig  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.planner import ParameterConstraints, Topology  # noqa: E402
from torchrec.distributed.planner.types import PlannerError  # noqa: E402

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig  # noqa: E402
from torchrec_tt.distributed import TT_COMPUTE_KERNEL, TTEmbeddingBagCollectionSharder  # noqa: E402
from torchrec_tt.distributed.planner import make_tt_planner  # noqa: E402

# Criteo Kaggle (DAC) cardinalities of the 26 categorical features
CRITEO_KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
D = 64
GiB = 1024**3
FUSED = {"optimizer": "exact_adagrad", "learning_rate": 0.05}


def _criteo_tables(tt_threshold=100_000, ranks=(16, 16)):
    tables = []
    for i, n in enumerate(CRITEO_KAGGLE):
        kw = {"name": f"t{i}", "num_embeddings": n, "embedding_dim": D, "feature_names": [f"c{i}"]}
        tables.append(TTEmbeddingBagConfig(**kw, tt_ranks=list(ranks)) if n >= tt_threshold else EmbeddingBagConfig(**kw))
    return tables


def _tt_bytes_oracle(cfg):
    """Cores + Adagrad state (one value per entry), written out independently."""
    r = [1, *cfg.tt_ranks, 1]
    entries = sum(cfg.tt_p_shapes[k] * r[k] * cfg.tt_q_shapes[k] * r[k + 1] for k in range(len(cfg.tt_p_shapes)))
    return 2 * 4 * entries


def _plan(model, topology, sharders, **kw):
    planner = make_tt_planner(topology, batch_size=512, model=model, fused_params=FUSED, **kw)
    return planner, planner.plan(model, sharders)


def test_criteo_kaggle_plans_with_tt_tables_at_real_size():
    tables = _criteo_tables()
    model = TTEmbeddingBagCollection(tables, device=torch.device("meta"))
    dense_bytes = sum(t.num_embeddings * D * 4 for t in tables)
    assert dense_bytes > 8 * GiB  # the uncompressed model would not fit the 1 GiB per rank below
    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=1 * GiB, ddr_cap=4 * GiB)
    planner, plan = _plan(model, topology, [TTEmbeddingBagCollectionSharder(fused_params=FUSED)])
    module_plan = plan.plan[""]
    assert sorted(module_plan) == sorted(t.name for t in tables)
    for ps in module_plan.values():
        assert ps.compute_kernel == TT_COMPUTE_KERNEL
    # the search space charged every TT table its real bytes (cores + Adagrad state) plus I/O buffers
    options = planner._enumerator.last_stored_search_space
    cfgs = {t.name: t for t in tables}
    checked = 0
    for so in options:
        cfg = cfgs[so.name]
        if isinstance(cfg, TTEmbeddingBagConfig) and so.sharding_type == "table_wise":
            storage = so.shards[0].storage.hbm
            assert _tt_bytes_oracle(cfg) <= storage < _tt_bytes_oracle(cfg) + 64 * 1024**2, (so.name, storage)
            checked += 1
    assert checked == sum(isinstance(t, TTEmbeddingBagConfig) for t in tables)


def test_mixed_tt_and_stock_model_gets_a_plan():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            tables = _criteo_tables()
            self.tt = TTEmbeddingBagCollection([t for t in tables if isinstance(t, TTEmbeddingBagConfig)], device="meta")
            self.stock = EmbeddingBagCollection([t for t in tables if not isinstance(t, TTEmbeddingBagConfig)], device=torch.device("meta"))

    model = Mixed()
    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=1 * GiB, ddr_cap=4 * GiB)
    _, plan = _plan(model, topology, [TTEmbeddingBagCollectionSharder(fused_params=FUSED), EmbeddingBagCollectionSharder()])
    assert set(plan.plan) == {"tt", "stock"}
    assert all(ps.compute_kernel == TT_COMPUTE_KERNEL for ps in plan.plan["tt"].values())
    assert all(ps.compute_kernel != TT_COMPUTE_KERNEL for ps in plan.plan["stock"].values())


def test_row_wise_constraint_keeps_alignment_and_clear_errors():
    cfg = TTEmbeddingBagConfig(name="big", num_embeddings=1_000_000, embedding_dim=D, feature_names=["f"],
                               tt_p_shapes=[100, 100, 100], tt_ranks=[8, 8])
    model = TTEmbeddingBagCollection([cfg], device="meta")
    topology = Topology(world_size=4, compute_device="cuda", hbm_cap=1 * GiB)
    _, plan = _plan(model, topology, [TTEmbeddingBagCollectionSharder()],
                    constraints={"big": ParameterConstraints(sharding_types=["row_wise"])})
    ps = plan.plan[""]["big"]
    assert ps.sharding_type == "row_wise"
    assert all(s.shard_sizes[0] % 10_000 == 0 for s in ps.sharding_spec.shards)
    bad = TTEmbeddingBagConfig(name="odd", num_embeddings=999_000, embedding_dim=D, feature_names=["f"],
                               tt_p_shapes=[100, 100, 100], tt_ranks=[8, 8])
    with pytest.raises(ValueError, match="TT table 'odd'.*align_config_for_row_wise"):
        make_tt_planner(topology, 512, model=TTEmbeddingBagCollection([bad], device="meta"),
                        constraints={"odd": ParameterConstraints(sharding_types=["row_wise"])})


def test_no_plan_fits_is_a_clear_error():
    model = TTEmbeddingBagCollection(_criteo_tables(ranks=(128, 128)), device=torch.device("meta"))
    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=8 * 1024**2, ddr_cap=8 * 1024**2)
    with pytest.raises(PlannerError, match="(?i)storage|memory|fit"):
        _plan(model, topology, [TTEmbeddingBagCollectionSharder(fused_params=FUSED)])
    assert math.prod([1]) == 1


def test_sharder_rejects_unknown_or_unsupported_optimizer_up_front():
    with pytest.raises(ValueError, match="fused_params\\['optimizer'\\].*unknown optimizer 'bogus'"):
        TTEmbeddingBagCollectionSharder(fused_params={"optimizer": "bogus"})
    with pytest.raises(NotImplementedError, match="LAMB"):
        TTEmbeddingBagCollectionSharder(fused_params={"optimizer": "lamb"})
    from torchrec_tt.distributed import resolve_table_optimizer

    p = torch.nn.Parameter(torch.zeros(2, 2))
    p._optimizer_classes, p._optimizer_kwargs = [torch.optim.SGD], [{"lr": 0.1, "momentum": 0.9}]
    with pytest.raises(ValueError, match="TT table 't0'.*momentum"):
        resolve_table_optimizer("t0", None, [p])


def test_cached_tables_never_data_parallel_nor_column_wise_with_rowwise_adagrad():
    """The sharded module refuses a cached table data-parallel, or column-wise with row-wise Adagrad:
    the constraints keep the planner from choosing either."""
    from torchrec_tt.distributed.planner import tt_parameter_constraints  # noqa: PLC0415

    kw = {"num_embeddings": 100_000, "embedding_dim": 128, "tt_ranks": [8, 8]}
    tables = [
        TTEmbeddingBagConfig(name="plain", feature_names=["a"], **kw),
        TTEmbeddingBagConfig(name="cached", feature_names=["b"], use_cache=True, cache_size=64, **kw),
    ]
    model = TTEmbeddingBagCollection(tables, device="meta")
    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=GiB)
    adagrad = tt_parameter_constraints(model, topology, fused_params=FUSED)
    assert {"data_parallel", "column_wise"} <= set(adagrad["plain"].sharding_types)
    assert "data_parallel" not in adagrad["cached"].sharding_types
    assert "column_wise" in adagrad["cached"].sharding_types
    rowwise = tt_parameter_constraints(
        model, topology, fused_params={"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.1}
    )
    assert "column_wise" in rowwise["plain"].sharding_types
    assert not {"data_parallel", "column_wise"} & set(rowwise["cached"].sharding_types)
    with pytest.raises(ValueError, match="TT table 'cached'.*never data-parallel"):
        tt_parameter_constraints(model, topology, {"cached": ParameterConstraints(sharding_types=["data_parallel"])}, FUSED)
    _, plan = _plan(model, topology, [TTEmbeddingBagCollectionSharder(fused_params=FUSED)])
    assert plan.plan[""]["cached"].sharding_type != "data_parallel"


def _stacked_column_shards(plan):
    """TT tables whose column-wise shards share a rank (the sharded module holds one per rank)."""
    return sorted(
        name for module_plan in plan.plan.values() for name, ps in module_plan.items()
        if ps.sharding_type == "column_wise" and len(set(ps.ranks)) < len(ps.ranks)
    )


def test_column_wise_plans_give_each_rank_at_most_one_shard_of_a_table(caplog):
    """D = 128 on 2 ranks: torchrec's partitioner placed 4 column shards of 32 as ranks [0, 1, 0, 1], a plan
    the sharded module refuses. The constraints now ask for shards of D / world_size (whole first-core
    slices), and a plan that still stacks shards (a user's smaller min_partition) is made again without
    column-wise sharding for that table."""
    tables = [TTEmbeddingBagConfig(name=f"t{i}", num_embeddings=1_000_000, embedding_dim=128, feature_names=[f"f{i}"],
                                   tt_ranks=[16, 16]) for i in range(3)]
    model = TTEmbeddingBagCollection(tables, device="meta")
    topology = Topology(world_size=2, compute_device="cuda", hbm_cap=GiB, ddr_cap=4 * GiB)
    sharders = [TTEmbeddingBagCollectionSharder(fused_params=FUSED)]

    def constraints(min_partition=None):
        return {t.name: ParameterConstraints(sharding_types=["column_wise", "table_wise"], min_partition=min_partition)
                for t in tables}

    planner, plan = _plan(model, topology, sharders, constraints=constraints())
    assert {c.min_partition for c in planner._constraints.values()} == {64}
    column_wise = {n: ps for n, ps in plan.plan[""].items() if ps.sharding_type == "column_wise"}
    assert column_wise, plan  # column-wise is still chosen where it pays
    for ps in column_wise.values():
        assert sorted(ps.ranks) == [0, 1] and [m.shard_sizes for m in ps.sharding_spec.shards] == [[1_000_000, 64]] * 2
    with caplog.at_level("WARNING", logger="torchrec_tt.distributed.planner"):
        _, plan = _plan(model, topology, sharders, constraints=constraints(min_partition=32))
    assert _stacked_column_shards(plan) == [], plan
    replanned = {r.getMessage().split("'")[1] for r in caplog.records if "planning it again" in r.getMessage()}
    assert replanned and all(plan.plan[""][n].sharding_type == "table_wise" for n in replanned), (replanned, plan)
    # column-wise alone cannot be planned again: a clear error instead of a plan the module refuses
    only_cw = {t.name: ParameterConstraints(sharding_types=["column_wise"], min_partition=32) for t in tables}
    with pytest.raises(ValueError, match="TT table 't.*column-wise is its only allowed sharding type"):
        _plan(model, topology, sharders, constraints=only_cw)


def test_tt_compute_scale_follows_the_measured_ratios_and_the_device_default():
    from torchrec_tt.distributed.planner import DEFAULT_FLOPS_PER_BYTE, TTPerfEstimator, tt_compute_scale

    def seed(rank):
        return TTEmbeddingBagConfig(name="t", num_embeddings=11_000_000, embedding_dim=64, feature_names=["f"],
                                    tt_p_shapes=[200, 220, 250], tt_q_shapes=[4, 4, 4], tt_ranks=[rank, rank])

    # 1 + FLOPs per row (2 * (4 r^2 4 + 16 r 4), written out) / (64 * flops_per_byte)
    for rank in (8, 16, 32, 64):
        flops = 2 * (4 * rank * 4 * rank + 16 * rank * 4)
        assert tt_compute_scale(seed(rank), 110.0) == pytest.approx(1 + flops / (64 * 110.0))
    # the measured TT / dense step ratios (2-core CPU: 1.3 / 1.8 / 3.3 / 12, within 20%; H100 at rank 32: 2.1)
    for rank, measured in ((8, 1.28), (16, 1.80), (32, 3.34), (64, 11.8)):
        assert tt_compute_scale(seed(rank), DEFAULT_FLOPS_PER_BYTE["cpu"]) == pytest.approx(measured, rel=0.2)
    assert tt_compute_scale(seed(32), DEFAULT_FLOPS_PER_BYTE["cuda"]) == pytest.approx(2.06, rel=0.1)
    assert TTPerfEstimator(Topology(world_size=2, compute_device="cpu"))._flops_per_byte == DEFAULT_FLOPS_PER_BYTE["cpu"]
    assert TTPerfEstimator(Topology(world_size=2, compute_device="cuda"), flops_per_byte=7.0)._flops_per_byte == 7.0
    with pytest.raises(ValueError, match="flops_per_byte must be > 0"):
        TTPerfEstimator(Topology(world_size=2, compute_device="cuda"), flops_per_byte=0.0)
