"""examples/train_dlrm.py and torchrec_tt.training: config merging, data loaders, 2-process runs.

The two end-to-end tests start the real script with 2 CPU processes (gloo):
``test_smoke_elastic_launch`` through ``elastic_launch`` (torchrec's golden-training
test pattern), ``test_kill_and_resume`` through the script's own ``--nproc 2``
launcher, killing rank 0 with SIGKILL mid-run and restarting.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from torchrec_tt.training import config as C
from torchrec_tt.training.config import ExperimentConfig, config_from_dict, load_yaml, parse_config
from torchrec_tt.training.data import (
    CriteoTsvDataset,
    InMemoryRecDataset,
    SyntheticCriteoDataset,
    fetch_recbole_wheel,
    load_movielens100k,
    make_dataset,
)
from torchrec_tt.training.model import (
    build_tables,
    embedding_size_report,
    select_tt_tables,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_dlrm.py"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


# ----------------------------------------------------------------------------- config
def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  batch_size: 64\n  zipf_alpha: 1.3\ntrain_steps: 7\nmodel:\n  tt_ranks: [4, 4]\n")
    cfg = parse_config(["--yaml_config", str(y), "--batch_size", "32", "--tt_ranks", "8,8"])
    assert cfg.data.batch_size == 32  # CLI over YAML
    assert cfg.data.zipf_alpha == 1.3  # YAML over default
    assert cfg.train.train_steps == 7  # flat YAML key
    assert cfg.model.tt_ranks == [8, 8]
    assert cfg.optim.dense_lr == C.OptimConfig().dense_lr  # untouched default
    assert parse_config(["--config", str(y)]).data.batch_size == 64  # alias


def test_cli_value_syntax():
    cfg = parse_config(
        ["--tt_ranks", "4", "6", "--progress_bar", "no", "--eval_batch_size", "none",
         "--tt_table_shapes", "{cat_2: {tt_p_shapes: [10, 10, 10]}}", "--num_embeddings_per_feature", "1_000,20",
         "--float32_matmul_precision", "high"]
    )
    assert cfg.train.float32_matmul_precision == "high"
    assert cfg.model.tt_ranks == [4, 6]
    assert cfg.train.progress_bar is False
    assert cfg.data.eval_batch_size is None
    assert cfg.model.tt_table_shapes == {"cat_2": {"tt_p_shapes": [10, 10, 10]}}
    assert cfg.data.num_embeddings_per_feature == [1000, 20]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"batch_sise": 3}, "unknown config key 'batch_sise'"),
        ({"data": {"embedding_dim": 8}}, "unknown key 'embedding_dim' in section 'data'"),
        ({"dataset": "imagenet"}, "dataset must be one of"),
        ({"embedding_dim": 32}, "must end with embedding_dim=32"),
        ({"tt_ranks": [4]}, "tt_ranks"),
        ({"batch_size": "many"}, "batch_size"),
        ({"progress_bar": "maybe"}, "boolean"),
        ({"train_steps": 0}, "synthetic stream is infinite"),
        ({"tt_cache_fraction": 1.5}, "tt_cache_fraction"),
        ({"tt_cache_eviction_policy": "lru"}, "tt_cache_eviction_policy must be one of"),
        ({"float32_matmul_precision": "low"}, "float32_matmul_precision must be one of"),
        ({"tt_table_shapes": {"a": {"cache_rows": 3}}}, "keys among"),
    ],
)
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(overrides)


def test_field_names_unique_and_every_field_is_a_flag():
    index = C._field_index()
    assert len(index) == sum(len(C.dataclasses.fields(c)) for c in C._SECTIONS.values())
    help_text = C._build_parser({}).format_help()
    assert all(f"--{name}" in help_text for name in index)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = parse_config(["--yaml_config", str(path)])
    assert load_yaml(path)  # overrides only, and no unknown keys
    if cfg.data.dataset != "movielens100k":
        names = [f"cat_{i}" for i in range(len(cfg.data.num_embeddings_per_feature))]
        tables = build_tables(names, cfg.data.num_embeddings_per_feature, cfg.model)
        assert sum(t.__class__.__name__ == "TTEmbeddingBagConfig" for t in tables) == cfg.model.tt_num_largest


def test_criteo_configs_real_cardinalities_and_compression():
    kaggle = parse_config(["--yaml_config", str(ROOT / "configs/criteo_kaggle.yaml")])
    assert kaggle.data.num_embeddings_per_feature == C.CRITEO_KAGGLE_NUM_EMBEDDINGS
    assert sum(C.CRITEO_KAGGLE_NUM_EMBEDDINGS) == 33_762_577
    names = [f"cat_{i}" for i in range(26)]
    report = embedding_size_report(build_tables(names, C.CRITEO_KAGGLE_NUM_EMBEDDINGS, kaggle.model))
    assert report.tt_tables == 7 and report.compression_ratio >= 100
    none = build_tables(names, C.CRITEO_KAGGLE_NUM_EMBEDDINGS, config_from_dict({"compression": "none"}).model)
    assert embedding_size_report(none).compression_ratio == 1.0
    tb = parse_config(["--yaml_config", str(ROOT / "configs/criteo_terabyte.yaml")])
    assert tb.data.num_embeddings_per_feature == C.CRITEO_TERABYTE_NUM_EMBEDDINGS
    dcn = parse_config(["--yaml_config", str(ROOT / "configs/mlperf_dcnv2.yaml")])
    assert dcn.model.model_type == "dlrm_dcn" and dcn.data.multi_hot_sizes == C.MLPERF_DCNV2_MULTI_HOT_SIZES


def test_tt_table_selection():
    cfg = config_from_dict({"tt_num_largest": 2, "tt_min_rows": 50, "tt_tables": ["t_c"]}).model
    assert select_tt_tables(["a", "b", "c", "d"], [100, 40, 10, 80], cfg) == ["a", "c", "d"]
    with pytest.raises(ValueError, match="not a feature"):
        select_tt_tables(["a"], [10], config_from_dict({"tt_tables": ["zz"]}).model)
    shaped = config_from_dict({"tt_table_shapes": {"a": {"tt_p_shapes": [10, 10], "tt_ranks": [3]}}}).model
    (t,) = build_tables(["a"], [100], shaped)
    assert t.tt_p_shapes == [10, 10] and t.tt_ranks == [3]


def test_tt_cache_settings_reach_the_table_configs():
    cfg = config_from_dict({
        "tt_num_largest": 3, "tt_min_rows": 0, "tt_ranks": [4, 4], "tt_cache_fraction": 0.01,
        "tt_cache_populate_interval": 7, "tt_cache_eviction_policy": "discard",
        "tt_table_shapes": {"b": {"cache_size": 5, "hashtbl_size": 64}, "c": {"use_cache": False}},
    }).model  # fmt: skip
    a, b, c, d = build_tables(["a", "b", "c", "d"], [1000, 2000, 3000, 10], cfg)
    assert (a.use_cache, a.cache_size, a.cache_populate_interval, a.cache_eviction_policy) == (True, 10, 7, "discard")
    assert (b.cache_size, b.hashtbl_size, b.cache_populate_interval) == (5, 64, 7)
    assert not c.use_cache and c.cache_size == 0  # opted out: the other cache settings are not applied
    assert type(d).__name__ == "EmbeddingBagConfig"  # not a TT table: no cache
    off = build_tables(["a"], [1000], config_from_dict({"tt_min_rows": 0, "tt_ranks": [4, 4]}).model)[0]
    assert not off.use_cache


# ----------------------------------------------------------------------------- data
def _kjt_ids(batch, key):
    return batch.sparse_features[key].values()


def test_synthetic_is_deterministic_and_world_size_invariant():
    sizes = [1000, 50_000, 7]
    one = SyntheticCriteoDataset(sizes, 16, 3, world_size=1)
    r0 = SyntheticCriteoDataset(sizes, 16, 3, rank=0, world_size=2)
    r1 = SyntheticCriteoDataset(sizes, 16, 3, rank=1, world_size=2)
    a, b = iter(one), iter(one)
    first = [next(a) for _ in range(4)]
    assert all(torch.equal(x.labels, next(b).labels) for x in first)  # deterministic
    # the global stream is the same for 1 and 2 ranks: batches 0,1 of world 1 = batch 0 of ranks 0,1
    assert torch.equal(next(iter(r0)).dense_features, first[0].dense_features)
    assert torch.equal(_kjt_ids(next(iter(r1)), "cat_1"), _kjt_ids(first[1], "cat_1"))
    resumed = SyntheticCriteoDataset(sizes, 16, 3, world_size=1, start_batch=3)
    assert torch.equal(next(iter(resumed)).labels, first[3].labels)
    assert not torch.equal(first[0].labels, first[1].labels)


def test_synthetic_ids_power_law_and_planted_signal():
    from torchmetrics.functional.classification import binary_auroc

    n = 2_000_000
    ds = SyntheticCriteoDataset([n, 100], 4096, 13, multi_hot_sizes=[3, 1], zipf_alpha=1.1)
    batches, logits = zip(*(ds.generate(u) for u in range(8)), strict=True)
    ids = torch.cat([_kjt_ids(b, "cat_0") for b in batches])
    assert ids.min() >= 0 and ids.max() < n and ids.max() > n // 2
    assert torch.equal(batches[0].sparse_features["cat_0"].lengths(), torch.full((4096,), 3, dtype=torch.int32))
    counts = torch.bincount(ids, minlength=n).sort(descending=True).values
    # heavy head: the 100 hottest ids carry far more than 100/n of the mass, and most ids are never drawn
    assert counts[:100].sum() > 0.2 * ids.numel() and (counts > 0).sum() < ids.numel()
    labels = torch.cat([b.labels for b in batches])
    assert 0.15 < labels.mean() < 0.35  # Criteo-like positive rate
    auc = float(binary_auroc(torch.sigmoid(torch.cat(logits)), labels.long()))
    assert 0.7 < auc < 0.9  # a learnable but noisy signal
    # without signal the labels are noise
    flat = SyntheticCriteoDataset([n, 100], 4096, 13, signal_scale=0.0)
    b0, l0 = flat.generate(0)
    assert torch.all(l0 == l0[0])


def test_synthetic_eval_split_size():
    ds = SyntheticCriteoDataset([100], 1000, 2, stage="val", world_size=2, eval_samples=5000)
    assert len(ds) == 3 and len(list(ds)) == 3  # ceil(5000 / 2000) units per rank


def test_in_memory_dataset_ranks_cover_rows_once():
    n = 1003
    dense = np.arange(n, dtype=np.float32)[:, None]
    lengths = (np.arange(n) % 3).astype(np.int32)  # includes empty bags
    values = np.repeat(np.arange(n), lengths)
    ranks = [
        list(InMemoryRecDataset(dense, {"f": (values, lengths)}, np.zeros(n), 100, r, 3, shuffle=True, seed=1, epochs=2))
        for r in range(3)
    ]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == 2 * math.ceil(n / 300)
    for epoch in range(2):
        per = len(ranks[0]) // 2
        rows = torch.cat([b.dense_features[:, 0] for r in ranks for b in r[epoch * per : (epoch + 1) * per]])
        assert sorted(rows.long().tolist()) == list(range(n))
    batch = ranks[0][0]
    f = batch.sparse_features["f"]
    rows = batch.dense_features[:, 0].long()
    assert torch.equal(f.lengths(), torch.from_numpy(lengths)[rows])
    assert torch.equal(f.values(), torch.repeat_interleave(rows, f.lengths().long()))
    resumed = InMemoryRecDataset(dense, {"f": (values, lengths)}, np.zeros(n), 100, 0, 3, seed=1, epochs=2, start_batch=5)
    assert torch.equal(next(iter(resumed)).dense_features, ranks[0][5].dense_features)


def test_criteo_npy_loader(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [50] * 26
    for day in range(3):
        np.save(tmp_path / f"day_{day}_dense.npy", rng.random((40, 13), dtype=np.float32))
        np.save(tmp_path / f"day_{day}_sparse.npy", rng.integers(0, 1000, (40, 26)).astype(np.int32))
        np.save(tmp_path / f"day_{day}_labels.npy", rng.integers(0, 2, (40, 1)).astype(np.int32))
    cfg = config_from_dict({"dataset": "criteo_npy", "criteo_path": str(tmp_path), "criteo_days": 3, "batch_size": 16,
                            "num_embeddings_per_feature": sizes, "train_steps": 0}).data
    train = list(make_dataset(cfg, "train", 0, 2))
    assert len(train) == len(list(make_dataset(cfg, "train", 1, 2)))
    assert train[0].dense_features.shape == (16, 13) and train[0].sparse_features.keys()[0] == "cat_0"
    assert int(train[0].sparse_features.values().max()) < 50  # hashed into the table sizes
    val = list(make_dataset(cfg, "val", 0, 1))
    assert sum(b.labels.numel() for b in val) == 20  # first half of the last day
    with pytest.raises(FileNotFoundError, match="day_"):
        list(make_dataset(config_from_dict({**cfg.__dict__, "criteo_days": 5, "train_steps": 0}).data, "train", 0, 1))


def _multihot_days(path, days=3, rows=(23, 17, 30), hot=(3, 1, 5)):
    rng = np.random.default_rng(1)
    data = []
    for day in range(days):
        dense = rng.random((rows[day], 13), dtype=np.float32)
        labels = rng.integers(0, 2, (rows[day], 1)).astype(np.int32)
        sparse = {str(f): rng.integers(0, 1000, (rows[day], h)).astype(np.int32) for f, h in enumerate(hot)}
        np.save(path / f"day_{day}_dense.npy", dense)
        np.save(path / f"day_{day}_labels.npy", labels)
        np.savez(path / f"day_{day}_sparse_multi_hot.npz", **sparse)
        data.append((dense, labels, sparse))
    return data


def test_npz_member_memmap_maps_without_loading(tmp_path):
    from torchrec_tt.training.criteo_multihot import npz_member_memmap

    arrays = {"0": np.arange(60, dtype=np.int32).reshape(20, 3), "big": np.arange(7, dtype=np.int64)}
    np.savez(tmp_path / "a.npz", **arrays)
    for name, arr in arrays.items():
        mapped = npz_member_memmap(tmp_path / "a.npz", name)
        assert isinstance(mapped, np.memmap) and mapped.dtype == arr.dtype
        np.testing.assert_array_equal(mapped, arr)
    np.savez_compressed(tmp_path / "c.npz", x=np.arange(3))
    with pytest.raises(ValueError, match="compressed"):
        npz_member_memmap(tmp_path / "c.npz", "x")
    with pytest.raises(KeyError, match="no array 'nope'"):
        npz_member_memmap(tmp_path / "a.npz", "nope")


def test_criteo_multihot_loader(tmp_path):
    data = _multihot_days(tmp_path)
    sizes = [50, 7, 1000]
    cfg = config_from_dict({"dataset": "criteo_multihot", "criteo_path": str(tmp_path), "criteo_days": 3,
                            "batch_size": 4, "num_embeddings_per_feature": sizes, "train_steps": 0}).data
    ranks = [list(make_dataset(cfg, "train", r, 3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 == len({len(make_dataset(cfg, "train", r, 3)) for r in range(3)})
    assert len(ranks[0]) == math.ceil(40 / 12)
    # the global batches, rank by rank, are the training days' rows in order
    batches = [b for j in range(len(ranks[0])) for r in ranks for b in [r[j]]]
    dense = torch.cat([b.dense_features for b in batches])
    torch.testing.assert_close(dense, torch.from_numpy(np.concatenate([data[0][0], data[1][0]])))
    labels = torch.cat([b.labels for b in batches])
    torch.testing.assert_close(labels, torch.from_numpy(np.concatenate([data[0][1], data[1][1]]).reshape(-1).astype(np.float32)))
    for f, (size, hot) in enumerate(zip(sizes, (3, 1, 5), strict=True)):
        ids = np.concatenate([data[0][2][str(f)], data[1][2][str(f)]]) % size
        got = torch.cat([b.sparse_features[f"cat_{f}"].values() for b in batches])
        assert torch.equal(got, torch.from_numpy(ids.reshape(-1).astype(np.int64)))
        assert all((b.sparse_features[f"cat_{f}"].lengths() == hot).all() for b in batches)
    # the last day: val is its first half, test the second
    val = list(make_dataset(cfg, "val", 0, 1))
    test = list(make_dataset(cfg, "test", 0, 1))
    torch.testing.assert_close(torch.cat([b.dense_features for b in val + test]), torch.from_numpy(data[2][0]))
    assert sum(b.labels.numel() for b in val) == 15
    # resume: skip the first global batches
    resumed = list(make_dataset(cfg, "train", 1, 3, start_batch=2))
    assert torch.equal(resumed[0].dense_features, ranks[1][2].dense_features)


def test_criteo_multihot_loader_errors(tmp_path):
    _multihot_days(tmp_path)
    base = {"dataset": "criteo_multihot", "criteo_path": str(tmp_path), "criteo_days": 3, "batch_size": 4,
            "num_embeddings_per_feature": [50, 7, 1000], "train_steps": 0}
    with pytest.raises(ValueError, match="the files hold \\[3, 1, 5\\] ids per sample, multi_hot_sizes says"):
        make_dataset(config_from_dict({**base, "multi_hot_sizes": [3, 1, 4]}).data, "train", 0, 1)
    with pytest.raises(ValueError, match="expected one per feature '0' .. '3'"):
        make_dataset(config_from_dict({**base, "num_embeddings_per_feature": [5, 5, 5, 5]}).data, "train", 0, 1)
    with pytest.raises(FileNotFoundError, match="day_3_dense.npy"):
        make_dataset(config_from_dict({**base, "criteo_days": 5}).data, "train", 0, 1)
    np.savez(tmp_path / "day_1_sparse_multi_hot.npz", **{str(f): np.zeros((16, 1), np.int32) for f in range(3)})
    with pytest.raises(ValueError, match="disagree on their rows"):
        make_dataset(config_from_dict(base).data, "train", 0, 1)


def test_criteo_tsv_loader(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(2000):
        ints = [str(int(x)) if x >= 0 else "" for x in rng.integers(-1, 100, 13)]
        cats = [format(int(x), "08x") if x else "" for x in rng.integers(0, 2**31, 26)]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *ints, *cats]))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    common = {"num_embeddings_per_feature": [1000] * 26}
    ranks = [list(CriteoTsvDataset([str(tmp_path / "train.txt")], "train", **common, batch_size=64, rank=r, world_size=2))
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1800 // 128  # 90% train rows, full groups only
    b = ranks[0][0]
    assert b.dense_features.shape == (64, 13) and torch.all(b.dense_features >= 0)
    assert int(b.sparse_features.values().max()) < 1000
    test = list(CriteoTsvDataset([str(tmp_path / "train.txt")], "test", **common, batch_size=10))
    assert len(test) == 10  # 5% of 2000 rows


# ----------------------------------------------------------------------------- MovieLens-100k
@pytest.fixture(scope="session")
def recbole_wheel(tmp_path_factory):
    cache = os.environ.get("TORCHREC_TT_TEST_CACHE") or tmp_path_factory.mktemp("recbole")
    try:
        return fetch_recbole_wheel(cache, timeout=240)
    except RuntimeError as e:
        text = str(e).lower()
        if any(s in text for s in ("connection", "network", "resolve", "timed out", "unreachable", "no matching")):
            pytest.skip(f"PyPI unreachable, cannot fetch recbole==1.2.1 (ships MovieLens-100k): {str(e)[-300:]}")
        raise


def test_movielens100k_from_recbole_wheel(recbole_wheel):
    ml = load_movielens100k(recbole_wheel)
    assert ml.labels.shape == (100_000,) and 0.5 < ml.labels.mean() < 0.6  # 55% of ratings are >= 4
    assert ml.num_embeddings["user_id"] == 944 and ml.num_embeddings["item_id"] == 1683  # + padding id 0
    values, lengths = ml.sparse["genre"]
    assert lengths.max() > 1 and values.max() < ml.num_embeddings["genre"]
    assert ml.dense.shape == (100_000, 3) and ml.dense.min() >= 0 and ml.dense.max() <= 1
    split = ml.split(0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [80_000, 10_000, 10_000]
    assert len(np.intersect1d(split["train"], split["test"])) == 0
    dense, sparse, labels = ml.subset(split["test"][:5])
    assert np.array_equal(labels, ml.labels[split["test"][:5]]) and sparse["genre"][1].sum() == len(sparse["genre"][0])


# ----------------------------------------------------------------------------- end to end
_TINY = [
    "--num_embeddings_per_feature", "4000", "3000", "50", "20", "--num_dense_features", "4",
    "--tt_num_largest", "2", "--tt_min_rows", "1000", "--tt_ranks", "4,4",
    "--dense_arch_layer_sizes", "16,16", "--over_arch_layer_sizes", "16,1",
    "--batch_size", "128", "--train_steps", "30", "--log_every", "5", "--eval_samples", "2048",
    "--num_workers", "0", "--progress_bar", "false", "--num_threads", "1",
]  # fmt: skip


def _read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def test_train_with_lfu_caches(tmp_path):
    """--tt_cache_fraction gives every TT table an LFU cache that the sharded model populates
    every --tt_cache_populate_interval lookups and trains; the summary reports its hits."""
    args = list(_TINY)
    args[args.index("--train_steps") + 1] = "12"
    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--tt_cache_fraction", "0.01", "--tt_cache_populate_interval", "4",
         "--out_dir", str(out)],
        check=True, env=_clean_env(), cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    caches = summary["cache_statistics_rank0"]
    assert len(caches) == 2 and all(name.startswith(("t_cat_0", "t_cat_1")) for name in caches)
    for st in caches.values():
        assert st["populates"] >= 2 and st["hits"] > 0 and 0 < st["hit_rate"] < 1 and st["occupancy"] == 1.0
    assert math.isfinite(summary["test_loss"]) and 0.5 < summary["test_auc"] < 1


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Uninterrupted 2-process run (also the reference of the resume test)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    out = tmp_path_factory.mktemp("smoke")
    lc = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", start_method="spawn", monitor_interval=0.5, max_restarts=0,
    )
    elastic_launch(lc, entrypoint=sys.executable)(str(SCRIPT), *_TINY, "--out_dir", str(out), "--checkpoint_every", "10")
    return out


@pytest.mark.distributed
def test_smoke_elastic_launch(smoke_run):
    rows = _read_rows(smoke_run)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert [r["samples"] for r in train][-1] == 30 * 128 * 2
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in train)
    evals = {r["split"]: r for r in rows if r["split"] != "train"}
    assert set(evals) == {"val", "test"} and evals["test"]["samples"] == 2048
    assert 0.5 < evals["test"]["auc"] < 1.0  # learned something from the planted signal
    csv_lines = (smoke_run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("time,split,step") and len(csv_lines) == len(rows) + 1
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 30 and summary["tt_tables"] == 2
    assert summary["embedding_params_stored"] < summary["embedding_params_uncompressed"]
    assert summary["test_auc"] == evals["test"]["auc"]
    assert sorted(p.name for p in (smoke_run / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]
    assert yaml.safe_load((smoke_run / "config.yaml").read_text())["train"]["train_steps"] == 30


@pytest.mark.distributed
def test_kill_and_resume(smoke_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--nproc", "2", *_TINY, "--out_dir", str(out), "--checkpoint_every", "10"]
    killed = subprocess.run([*cmd, "--simulate_failure_at_step", "15"], capture_output=True, text=True,
                            env=_clean_env(), timeout=300)
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000010"]  # step 20 never happened
    assert max(r["step"] for r in _read_rows(out)) == 15  # rows written after the checkpoint...
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000010") and summary["steps"] == 30
    rows = _read_rows(out)
    assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20, 25, 30]  # ...were replaced
    # The resumed run continues the same trajectory as the uninterrupted one: model, fused and
    # dense optimizer state and the data position were all restored.
    ref = _read_rows(smoke_run)
    for mine, theirs in zip(rows, ref, strict=True):
        assert (mine["split"], mine["step"]) == (theirs["split"], theirs["step"])
        for key in ("loss", "auc"):
            if theirs.get(key) is not None:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (mine, theirs)


@pytest.mark.parametrize("module", ["config", "data", "model", "criteo_multihot"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"torchrec_tt.training.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_experiment_config_roundtrip():
    cfg = ExperimentConfig()
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
