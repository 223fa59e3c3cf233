"""LFU caches under DistributedModelParallel (2 gloo processes): every shard caches its own rows.

Oracle: a dense float32 model built from the unsharded reference cores (``full_weight``)
with the oracle's cached rows overlaid, pooled by plain ``nn.EmbeddingBag`` tables; the
gradient of a cached row trains that row, the rest flows to the cores by the chain rule;
textbook optimizer steps (``tt_dist_cases.reference_update``). The oracle picks every
shard's cached rows itself: the ``cache_size`` most frequent ids of the shard's row range
(``collections.Counter``, ties to the smaller id), kept rows keep their values and state,
evicted rows are dropped (``discard`` policy; write-back is checked separately).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from tt_multiprocess import run_multiprocess

pytestmark = pytest.mark.distributed

CACHE = 3
TOL = 2e-5


def _configs(policy: str) -> list[Any]:
    from dataclasses import replace

    from tt_dist_cases import tables

    return [
        replace(t, use_cache=True, cache_size=CACHE, hashtbl_size=256, cache_eviction_policy=policy)
        if t.name in ("t0", "t1") else t
        for t in tables()
    ]


def _plan(kind: str) -> dict[str, Any]:
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from torchrec_tt.distributed import TT_COMPUTE_KERNEL as CK

    if kind == "rw_tw":
        return {"t0": row_wise(compute_kernel=CK), "t1": table_wise(rank=1, compute_kernel=CK),
                "t2": table_wise(rank=0, compute_kernel=CK)}
    if kind == "cw":
        return {"t0": column_wise(ranks=[0, 1], compute_kernel=CK), "t1": column_wise(ranks=[1, 0], compute_kernel=CK),
                "t2": table_wise(rank=1, compute_kernel=CK)}
    if kind == "tw":
        return {"t0": table_wise(rank=0, compute_kernel=CK), "t1": table_wise(rank=1, compute_kernel=CK),
                "t2": table_wise(rank=0, compute_kernel=CK)}
    raise ValueError(kind)


class _Oracle:
    """Dense model: reference cores + cached rows, per shard row range."""

    def __init__(self, plan: dict[str, Any], configs: list[Any], opt: str, lr: float, eps: float) -> None:
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from tt_dist_cases import reference_module

        from torchrec_tt import TTEmbeddingBagCollection

        self.ref = reference_module(False)  # same seed as build_dmp: same initial values
        self.configs = {c.name: c for c in configs}
        self.opt, self.lr, self.eps = opt, lr, eps
        self.state: dict[int, torch.Tensor] = {}
        plain = [EmbeddingBagConfig(name=c.name, num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
                                    feature_names=list(c.feature_names), pooling=c.pooling) for c in configs]
        self.dense = TTEmbeddingBagCollection(plain)
        self.ranges = {
            t: sorted({(md.shard_offsets[0], md.shard_offsets[0] + md.shard_sizes[0]) for md in ps.sharding_spec.shards})
            for t, ps in plan.items() if getattr(self.configs[t], "use_cache", False)
        }
        self.rows: dict[str, dict[int, torch.Tensor]] = {t: {} for t in self.ranges}
        self.counts: dict[str, Counter] = {t: Counter() for t in self.ranges}

    def _full(self, table: str) -> torch.Tensor:
        bag = self.ref.embedding_bags[table]
        return bag.full_weight() if hasattr(bag, "tt_cores") else bag.weight

    def populate(self) -> None:
        for t, ranges in self.ranges.items():
            table = self._full(t).detach()
            new: dict[int, torch.Tensor] = {}
            for lo, hi in ranges:
                ids = [i for i in self.counts[t] if lo <= i < hi]
                for i in sorted(ids, key=lambda i: (-self.counts[t][i], i))[:CACHE]:
                    new[i] = self.rows[t][i] if i in self.rows[t] else table[i].clone().view(1, -1)
            self.rows[t] = new

    def step(self, kjt: Any, coef: dict[str, torch.Tensor], world_size: int, train: bool) -> dict[str, torch.Tensor]:
        from tt_dist_cases import ref_params, reference_update

        full = {t: self._full(t) for t in self.configs}
        with torch.no_grad():
            for t, bag in self.dense.embedding_bags.items():
                w = full[t].detach().clone()
                for i, row in self.rows.get(t, {}).items():
                    w[i] = row[0]
                bag.weight.copy_(w)
                bag.weight.grad = None
        out = self.dense(kjt).to_dict()
        if not train:
            return {n: v.detach() for n, v in out.items()}
        (sum((out[n] * coef[n]).sum() for n in sorted(out)) / world_size).backward()
        for t, bag in self.dense.embedding_bags.items():
            grad = bag.weight.grad.clone()
            for i, row in self.rows.get(t, {}).items():
                reference_update(row, grad[i].view(1, -1), self.state, self.opt, self.lr, self.eps)
                grad[i] = 0
            params = ref_params(self.ref, t)
            grads = torch.autograd.grad(full[t], params, grad_outputs=grad)
            for p, g in zip(params, grads, strict=True):
                reference_update(p, g, self.state, self.opt, self.lr, self.eps)
        for t in self.ranges:
            for f in self.configs[t].feature_names:
                self.counts[t].update(kjt[f].values().tolist())
        return {n: v.detach() for n, v in out.items()}


def _local_cached_ids(dmp: Any) -> dict[str, set[int]]:
    from tt_dist_cases import find_sharded

    from torchrec_tt.modules.tt_cache import EMPTY_ID

    out: dict[str, set[int]] = {}
    for shard in find_sharded(dmp)._local_shards():
        if shard.cache is not None:
            ids = [i + shard.row_offset for i in shard.cache.cache_ids.tolist() if i != EMPTY_ID]
            out.setdefault(shard.table_name, set()).update(ids)
    return out


def _training_worker(rank: int, world_size: int, cases: list[tuple[str, str]], ckpt_dir: str) -> dict[str, float]:
    from tt_dist_cases import build_dmp, global_batch, loss_coefficients, make_kjt

    from torchrec_tt.distributed.checkpoint import load_checkpoint, save_checkpoint
    from torchrec_tt.modules.tt_cache import cache_statistics, populate_caches

    fused = {"sgd": {"optimizer": "exact_sgd", "learning_rate": 0.3},
             "adagrad": {"optimizer": "exact_adagrad", "learning_rate": 0.1, "eps": 1e-8},
             "rowwise_adagrad": {"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.1, "eps": 1e-8}}
    res: dict[str, float] = {}
    batch, gb = 4, 4 * world_size
    lo, hi = rank * batch, (rank + 1) * batch
    for kind, opt in cases:
        configs = _configs("discard")
        plan_spec = _plan(kind)
        dmp, plan = build_dmp(rank, world_size, plan_spec, fused[opt], False, table_configs=configs)
        oracle = _Oracle(plan, configs, opt, fused[opt]["learning_rate"], fused[opt].get("eps", 0.0))
        err, mismatched = 0.0, 0
        for step in range(6):
            if step in (1, 3):
                populate_caches(dmp)
                oracle.populate()
                want = {t: {i for i in rows if any(a <= i < b for a, b in _my_ranges(dmp, t))} for t, rows in oracle.rows.items()}
                got = _local_cached_ids(dmp)
                mismatched += sum(got.get(t, set()) != want[t] for t in want if t in got)
            keys, ids, wts = global_batch(step, gb, False)
            out = dmp(make_kjt(keys, ids, wts, lo, hi)).wait().to_dict()
            coef = loss_coefficients(step, list(out), gb, 8)
            ref_out = oracle.step(make_kjt(keys, ids, wts, 0, gb), coef, world_size, train=True)
            err = max(err, max(float((out[n] - ref_out[n][lo:hi]).detach().abs().max()) for n in out))
            sum((out[n] * coef[n][lo:hi]).sum() for n in sorted(out)).backward()
        keys, ids, wts = global_batch(99, gb, False)
        out = dmp(make_kjt(keys, ids, wts, lo, hi)).wait().to_dict()
        ref_out = oracle.step(make_kjt(keys, ids, wts, 0, gb), {}, world_size, train=False)
        err = max(err, max(float((out[n] - ref_out[n][lo:hi]).abs().max()) for n in out))
        stats = cache_statistics(dmp)
        res[f"{kind}/{opt} forward"] = err
        res[f"{kind}/{opt} cache sets differ"] = float(mismatched)
        res[f"{kind}/{opt} no hits"] = float(sum(s["hits"] for s in stats.values()) == 0)
        if kind == "rw_tw" and opt == "adagrad":
            # DCP round trip mid-training (same plan, other seed): identical next steps
            save_checkpoint(dmp, f"{ckpt_dir}/{kind}", dmp.fused_optimizer)
            other, _ = build_dmp(rank, world_size, plan_spec, fused[opt], False, table_configs=configs, seed=11)
            load_checkpoint(other, f"{ckpt_dir}/{kind}", other.fused_optimizer)
            diff = 0.0
            for step in range(10, 13):
                if step == 11:
                    populate_caches(dmp)
                    populate_caches(other)
                keys, ids, wts = global_batch(step, gb, False)
                a = dmp(make_kjt(keys, ids, wts, lo, hi)).wait().to_dict()
                b = other(make_kjt(keys, ids, wts, lo, hi)).wait().to_dict()
                diff = max(diff, max(float((a[n] - b[n]).detach().abs().max()) for n in a))
                coef = loss_coefficients(step, list(a), gb, 8)
                sum((a[n] * coef[n][lo:hi]).sum() for n in sorted(a)).backward()
                sum((b[n] * coef[n][lo:hi]).sum() for n in sorted(b)).backward()
            res["dcp round trip next steps"] = diff
            # the same checkpoint under another shard layout of a cached table: refused, nothing loaded
            tw, _ = build_dmp(rank, world_size, _plan("tw"), fused[opt], False, table_configs=configs, seed=12)
            try:
                load_checkpoint(tw, f"{ckpt_dir}/{kind}", tw.fused_optimizer)
                res["other layout refused"] = 0.0
            except ValueError as e:
                res["other layout refused"] = float("embedding_bags.t0.cache" in str(e))
    return res


def _my_ranges(dmp: Any, table: str) -> list[tuple[int, int]]:
    from tt_dist_cases import find_sharded

    return [(s.row_offset, s.row_offset + s.num_rows) for s in find_sharded(dmp)._local_shards() if s.table_name == table]


def test_cached_tables_train_like_the_dense_oracle_and_checkpoint(tmp_path) -> None:
    cases = [("rw_tw", "adagrad"), ("rw_tw", "rowwise_adagrad"), ("cw", "sgd"), ("cw", "adagrad")]
    results = run_multiprocess(_training_worker, world_size=2, cases=cases, ckpt_dir=str(tmp_path))
    for rank, res in enumerate(results):
        for key, value in res.items():
            if key == "other layout refused":
                assert value == 1.0, (rank, res)
            else:
                assert value <= TOL, (rank, key, res)


def _writeback_worker(rank: int, world_size: int) -> dict[str, float]:
    import torch.distributed as dist
    from tt_dist_cases import build_dmp, find_sharded, global_batch, loss_coefficients, make_kjt

    from torchrec_tt.modules.tt_cache import EMPTY_ID
    from torchrec_tt.ops import tt_lookup_rows

    fused = {"optimizer": "exact_sgd", "learning_rate": 0.5}
    dmp, _ = build_dmp(rank, world_size, {**_plan("rw_tw")}, fused, False, table_configs=_configs("writeback"))
    sharded = find_sharded(dmp)
    shard = next(s for s in sharded._local_shards() if s.table_name == "t0")  # row-wise: inner cores replicated
    shard.cache.record(torch.arange(5).repeat(3))  # ids 0..2 (local) get cached
    shard.cache_populate()
    for step in range(4):  # train through the whole model, cached rows included
        keys, ids, wts = global_batch(step, 8, False)
        ids["f0"] = [[0, 1, 2] for _ in ids["f0"]] if rank == 0 else ids["f0"]
        out = dmp(make_kjt(keys, ids, wts, rank * 4, rank * 4 + 4)).wait().to_dict()
        coef = loss_coefficients(step, list(out), 8, 8)
        sum((out[n] * coef[n][rank * 4 : rank * 4 + 4]).sum() for n in sorted(out)).backward()
    cached = [i for i in shard.cache.cache_ids.tolist() if i != EMPTY_ID]
    learned = shard.cache.cache_weight[: len(cached)].clone()
    ids_t = torch.tensor(cached)

    def rows() -> torch.Tensor:
        return tt_lookup_rows([c.detach() for c in shard.cores], ids_t, shard.p, shard.q, shard.ranks, shard.num_rows)

    before = float((rows() - learned).norm())
    inner_before = [c.detach().clone() for c in shard.cores[1:]]
    shard.cache.record(torch.tensor([20, 21, 22]).repeat(50))  # hotter ids evict 0..2
    shard.cache_populate()
    after = float((rows() - learned).norm())
    inner = torch.cat([c.detach().reshape(-1) for c in shard.cores[1:]])
    gathered = [torch.zeros_like(inner) for _ in range(world_size)]
    dist.all_gather(gathered, inner)
    return {
        "residual ratio": after / before,
        "inner cores unchanged": float(all(torch.equal(a, b) for a, b in zip(inner_before, shard.cores[1:], strict=True))),
        "replicas equal": float(all(torch.equal(gathered[0], g) for g in gathered)),
    }


def test_sharded_writeback_fits_only_the_shards_own_cores() -> None:
    for rank, res in enumerate(run_multiprocess(_writeback_worker, world_size=2)):
        assert res["residual ratio"] < 0.5, (rank, res)
        assert res["inner cores unchanged"] == 1.0 and res["replicas equal"] == 1.0, (rank, res)


def _errors_worker(rank: int, world_size: int) -> dict[str, str]:
    from torchrec.distributed.sharding_plan import data_parallel
    from tt_dist_cases import build_dmp

    out = {}
    for name, per_table, fused in (
        ("dp", {**_plan("tw"), "t0": data_parallel()}, {"optimizer": "exact_sgd", "learning_rate": 0.1}),
        ("no fused optimizer", _plan("tw"), None),
        ("cw rowwise", _plan("cw"), {"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.1}),
    ):
        try:
            build_dmp(rank, world_size, per_table, fused, False, table_configs=_configs("writeback"))
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    return out


def test_unsupported_cache_setups_are_refused_naming_the_table() -> None:
    for res in run_multiprocess(_errors_worker, world_size=2):
        assert "table 't0'" in res["dp"] and "data_parallel" in res["dp"], res
        assert "use_cache=True needs a fused optimizer" in res["no fused optimizer"], res
        assert "column_wise sharding and row-wise Adagrad" in res["cw rowwise"], res
