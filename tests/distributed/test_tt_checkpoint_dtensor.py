"""DCP checkpoints with DTensor output (``ShardingEnv(output_dtensor=True)``), optimizer state included.

One 2-process gloo spawn: DTensor state under RW and CW (``LocalShardsWrapper`` pieces that alias
the parameters and optimizer state), a DCP save with DTensor, loads under TW/RW/CW with ShardedTensor
output and with DTensor output (outputs equal after the reload and after one more fused-optimizer
step), a ShardedTensor checkpoint loaded with DTensor output, and a mislaid DTensor refused with
nothing loaded; row-wise Adagrad state saved under RW and under CW with a table on one rank only (its
state held by that rank) and loaded across those layouts (outputs equal after one more step on every
rank). Then one 1-process spawn loads the world-size-2 checkpoints (2 -> 1), the row-wise one of the
column-wise table on one rank included.
"""

from __future__ import annotations

import pytest
import torch
from tt_multiprocess import run_multiprocess

pytestmark = pytest.mark.distributed

ADAGRAD = {"optimizer": "exact_adagrad", "learning_rate": 0.1, "eps": 1e-8}
ROWWISE = {"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.1, "eps": 1e-8}
TOL = 2e-5
SAVED_WORLD_SIZE = 2
GLOBAL_BATCH = 8


def _plans(world_size, cw_t1_on_last_rank=True):
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from torchrec_tt.distributed import TT_COMPUTE_KERNEL as CK

    last = world_size - 1
    return {
        "tw": {"t0": table_wise(rank=0, compute_kernel=CK), "t1": table_wise(rank=last, compute_kernel=CK),
               "t2": table_wise(rank=last, compute_kernel=CK)},
        "rw": {t: row_wise(compute_kernel=CK) for t in ("t0", "t1", "t2")},
        # t1 on the last rank only: at world size 2 rank 0 holds an empty DTensor of it
        "cw": {"t0": column_wise(ranks=sorted({last, 0}, reverse=True), compute_kernel=CK),
               "t1": column_wise(ranks=[last] if cw_t1_on_last_rank else sorted({0, last}), compute_kernel=CK),
               "t2": column_wise(ranks=sorted({0, last}), compute_kernel=CK)},
    }


def _step(dmp, rank, world_size, seed, train=True):
    """Forward (and a fused-optimizer step) on this rank's part of a global batch of 8.

    The loss is scaled by ``world_size / 2`` so that a step at world size 1 equals one at world
    size 2 (torchrec divides gradients by the world size).
    """
    from tt_dist_cases import global_batch, loss_coefficients, make_kjt

    batch = GLOBAL_BATCH // world_size
    keys, ids, wts = global_batch(seed, GLOBAL_BATCH, False)
    lo, hi = rank * batch, (rank + 1) * batch
    out = dmp(make_kjt(keys, ids, wts, lo, hi)).wait().to_dict()
    if train:
        coef = loss_coefficients(seed, list(out), GLOBAL_BATCH, 8)
        loss = sum((out[n] * coef[n][lo:hi]).sum() for n in sorted(out))
        (loss * (world_size / SAVED_WORLD_SIZE)).backward()
    return {n: v.detach() for n, v in out.items()}


def _save_after_two_steps(dmp, rank, world_size, path):
    """Two training steps and a DCP save (optimizer included); then the outputs that a load of it must
    give: before and after one more step."""
    from torchrec_tt.distributed.checkpoint import save_checkpoint

    for s in range(2):
        _step(dmp, rank, world_size, s)
    save_checkpoint(dmp, path, dmp.fused_optimizer)
    before = _step(dmp, rank, world_size, 7, train=False)
    _step(dmp, rank, world_size, 3)
    return before, _step(dmp, rank, world_size, 8, train=False)


def _load_and_compare(dmp, rank, world_size, path, want, errs, name):
    """Load ``path`` into ``dmp``; ``errs[name]`` (and ``name + ' after step'``): the largest differences from
    the saved model's outputs (``want``: before, after) before and after one more step."""
    from torchrec_tt.distributed.checkpoint import load_checkpoint

    load_checkpoint(dmp, path, dmp.fused_optimizer)
    errs[name] = _max_diff(want[0], _step(dmp, rank, world_size, 7, train=False))
    _step(dmp, rank, world_size, 3)
    errs[f"{name} after step"] = _max_diff(want[1], _step(dmp, rank, world_size, 8, train=False))


def _max_diff(a, b):
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _describe(dmp):
    """Types and local pieces of the TT module's checkpoint tensors and their optimizer state."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor
    from tt_dist_cases import find_sharded

    # the TT cores (parameters) and the fused optimizer's state (non-persistent buffers)
    live = [*dmp.parameters(), *find_sharded(dmp).buffers()]
    storages = {t.untyped_storage().data_ptr() for t in live}

    def one(v):
        if isinstance(v, DTensor):
            lsw = v._local_tensor
            pieces = [(list(off), list(t.shape)) for t, off in zip(lsw.local_shards(), lsw.local_offsets(), strict=True)]
            return {"type": "DTensor", "wrapper": type(lsw).__name__, "shape": list(v.shape), "pieces": pieces,
                    "placements": [str(p) for p in v.placements],
                    "aliases": all(t.untyped_storage().data_ptr() in storages for t in lsw.local_shards())}
        if isinstance(v, ShardedTensor):
            return {"type": "ShardedTensor", "shape": list(v.size()),
                    "pieces": [(list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)) for s in v.local_shards()]}
        return {"type": "Tensor", "shape": list(v.shape)}

    model = {k: one(v) for k, v in dmp.state_dict().items()}
    optim = {k: {n: one(x) for n, x in s.items()} for k, s in dmp.fused_optimizer.state_dict()["state"].items()}
    return {"model": model, "optim": optim}


def _world2_worker(rank, world_size, ckpt_dir):
    from tt_dist_cases import build_dmp

    from torchrec_tt.distributed.checkpoint import load_checkpoint, save_checkpoint

    plans = _plans(world_size)
    res = {"errs": {}}
    errs = res["errs"]
    # --- source: RW with DTensor output, two steps, DCP save with DTensor
    src, _ = build_dmp(rank, world_size, plans["rw"], ADAGRAD, False, seed=0, output_dtensor=True)
    res["rw_dt"] = _describe(src)
    want = _save_after_two_steps(src, rank, world_size, f"{ckpt_dir}/rw_dt")
    # --- load under TW/RW/CW, with ShardedTensor output and with DTensor output
    targets = {}
    for kind in ("tw", "rw", "cw"):
        for out in ("st", "dt"):
            dmp, _ = build_dmp(rank, world_size, plans[kind], ADAGRAD, False, seed=11, output_dtensor=out == "dt")
            name = f"{kind}_{out}"
            if name in ("cw_dt", "rw_st"):
                res[name] = _describe(dmp)
            _load_and_compare(dmp, rank, world_size, f"{ckpt_dir}/rw_dt", want, errs, f"rw_dt -> {name}")
            targets[name] = dmp
    # --- save again: CW with DTensor output, TW with ShardedTensor output (all targets hold the same state)
    save_checkpoint(targets["cw_dt"], f"{ckpt_dir}/cw_dt", targets["cw_dt"].fused_optimizer)
    save_checkpoint(targets["tw_st"], f"{ckpt_dir}/tw_st", targets["tw_st"].fused_optimizer)
    expected = {"before": _step(targets["cw_dt"], rank, world_size, 10, train=False)}
    # ShardedTensor checkpoint -> DTensor output (RW), then one step on both
    dmp, _ = build_dmp(rank, world_size, plans["rw"], ADAGRAD, False, seed=12, output_dtensor=True)
    load_checkpoint(dmp, f"{ckpt_dir}/tw_st", dmp.fused_optimizer)
    errs["tw_st -> rw_dt"] = _max_diff(expected["before"], _step(dmp, rank, world_size, 10, train=False))
    _step(targets["cw_dt"], rank, world_size, 4)
    expected["after"] = _step(targets["cw_dt"], rank, world_size, 11, train=False)
    _step(dmp, rank, world_size, 4)
    errs["tw_st -> rw_dt after step"] = _max_diff(expected["after"], _step(dmp, rank, world_size, 11, train=False))
    torch.save(expected, f"{ckpt_dir}/expected_{rank}.pt")
    # --- a DTensor laid out for another plan is refused before anything is copied
    victim = targets["cw_st"]
    params = {k: v.detach().clone() for k, v in victim.named_parameters()}
    try:
        victim.load_state_dict(src.state_dict())
    except RuntimeError as e:
        res["mislaid_msg"] = str(e)
    else:
        res["mislaid_msg"] = ""
    res["mislaid_unchanged"] = all(torch.equal(params[k], v) for k, v in victim.named_parameters())
    # --- a regular (evenly sharded) DTensor is gathered on every rank, also rank 0 that holds no piece of t1
    from torch.distributed.tensor import Shard, distribute_tensor

    key = "embedding_bags.t1.canonical_cores.0"
    value = torch.arange(48.0).reshape(1, 4, 4, 3)
    victim.load_state_dict({key: distribute_tensor(value, src.state_dict()[key].device_mesh, [Shard(1)])}, strict=False)
    res["regular_dtensor"] = [torch.equal(s.tensor, value) for s in victim.state_dict()[key].local_shards()]
    # --- row-wise Adagrad: 1-D optimizer state as a Shard(0) DTensor under RW
    rsrc, _ = build_dmp(rank, world_size, plans["rw"], ROWWISE, False, seed=0, output_dtensor=True)
    res["rowwise_rw_dt"] = _describe(rsrc)
    want_rw = _save_after_two_steps(rsrc, rank, world_size, f"{ckpt_dir}/rowwise_rw_dt")
    # "cw" with t1 on the last rank only (rank 0 holds no column of t1): the row-wise state of a column-wise
    # first core is saved once, from its owner rank, as a one-piece tensor that every rank has
    lone, _ = build_dmp(rank, world_size, plans["cw"], ROWWISE, False, seed=13, output_dtensor=False)
    res["rowwise_lone_cw"] = _describe(lone)
    want_lone = _save_after_two_steps(lone, rank, world_size, f"{ckpt_dir}/rowwise_lone_cw")
    torch.save({"before": want_lone[0], "after": want_lone[1]}, f"{ckpt_dir}/rowwise_lone_expected_{rank}.pt")
    rowwise_plans = _plans(world_size, cw_t1_on_last_rank=False)
    loads = [("rowwise_rw_dt", plans["cw"], "lone_cw", "dt"), ("rowwise_lone_cw", rowwise_plans["cw"], "cw", "dt"),
             ("rowwise_lone_cw", rowwise_plans["rw"], "rw", "st")]
    loads += [("rowwise_rw_dt", rowwise_plans[kind], kind, out) for kind, out in (("cw", "st"), ("tw", "dt"))]
    # t1's columns on both ranks (owner rank 0): rank 1's copy of the loaded state comes by broadcast, and the
    # outputs after one more step (each rank updates its own columns with it) check it on both ranks
    for ckpt, plan, kind, out in loads:
        dmp, _ = build_dmp(rank, world_size, plan, ROWWISE, False, seed=17, output_dtensor=out == "dt")
        want = want_rw if ckpt == "rowwise_rw_dt" else want_lone
        _load_and_compare(dmp, rank, world_size, f"{ckpt_dir}/{ckpt}", want, errs, f"{ckpt} -> {kind}_{out}")
    # --- a rank without a piece (e.g. an empty row-wise shard): 1-D DTensor saved from rank 0, loaded on rank 1
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from tt_dist_cases import find_sharded

    module = find_sharded(rsrc)

    def on_one_rank(owner, values):
        return module._make_dtensor(values if rank == owner else None, [ShardMetadata([0], [6], f"rank:{owner}/cpu")], (6,), 0)

    dcp.save({"x": on_one_rank(0, torch.arange(6.0))}, checkpoint_id=f"{ckpt_dir}/one_rank")
    loaded = torch.zeros(6)
    dcp.load({"x": on_one_rank(1, loaded)}, checkpoint_id=f"{ckpt_dir}/one_rank")
    res["one_rank"] = loaded.tolist()
    return res


def _world1_worker(rank, world_size, ckpt_dir):
    """Load the world-size-2 checkpoints (DTensor, ShardedTensor, row-wise CW) at world size 1, then one step."""
    from tt_dist_cases import build_dmp

    from torchrec_tt.distributed.checkpoint import load_checkpoint

    def whole_batch(prefix):
        parts = [torch.load(f"{ckpt_dir}/{prefix}_{r}.pt") for r in range(SAVED_WORLD_SIZE)]
        return {when: {n: torch.cat([p[when][n] for p in parts]) for n in parts[0][when]} for when in parts[0]}

    full, lone = whole_batch("expected"), whole_batch("rowwise_lone_expected")
    plans = _plans(world_size)
    errs = {}
    describe = {}
    for ckpt, kind, out in (("cw_dt", "rw", "st"), ("cw_dt", "cw", "dt"), ("tw_st", "tw", "dt"), ("tw_st", "rw", "dt")):
        dmp, _ = build_dmp(rank, world_size, plans[kind], ADAGRAD, False, seed=21, output_dtensor=out == "dt")
        name = f"{ckpt}(W=2) -> {kind}_{out}(W=1)"
        if (kind, out) == ("cw", "dt"):
            describe = _describe(dmp)
        load_checkpoint(dmp, f"{ckpt_dir}/{ckpt}", dmp.fused_optimizer)
        errs[name] = _max_diff(full["before"], _step(dmp, rank, world_size, 10, train=False))
        _step(dmp, rank, world_size, 4)
        errs[f"{name} after step"] = _max_diff(full["after"], _step(dmp, rank, world_size, 11, train=False))
    # the row-wise state of a column-wise table held by one rank of two, loaded at world size 1
    dmp, _ = build_dmp(rank, world_size, plans["cw"], ROWWISE, False, seed=23, output_dtensor=False)
    _load_and_compare(dmp, rank, world_size, f"{ckpt_dir}/rowwise_lone_cw", (lone["before"], lone["after"]), errs,
                      "rowwise_lone_cw(W=2) -> cw_st(W=1)")
    return {"errs": errs, "cw_dt": describe}


def _check_dtensor(d, shape, pieces, placement):
    assert d["type"] == "DTensor" and d["wrapper"] == "LocalShardsWrapper", d
    assert (d["shape"], d["pieces"], d["placements"]) == (shape, pieces, [placement]), (d, shape, pieces, placement)
    assert d["aliases"], {k: d[k] for k in ("pieces", "placements", "aliases")}


def test_dtensor_checkpoints_reshard_across_plans_output_types_and_world_sizes(tmp_path):
    results = run_multiprocess(_world2_worker, world_size=2, ckpt_dir=str(tmp_path))
    for rank, res in enumerate(results):
        assert max(res["errs"].values()) < TOL, (rank, res["errs"])
        # RW with DTensor output: sharded first cores (rows of t0: p_1 slices of 10 rows) and plain t2
        model, optim = res["rw_dt"]["model"], res["rw_dt"]["optim"]
        _check_dtensor(model["embedding_bags.t0.canonical_cores.0"], [1, 6, 2, 3], [([0, 3 * rank, 0, 0], [1, 3, 2, 3])], "S(1)")
        _check_dtensor(model["embedding_bags.t1.canonical_cores.0"], [1, 4, 4, 3], [([0, 2 * rank, 0, 0], [1, 2, 4, 3])], "S(1)")
        _check_dtensor(model["embedding_bags.t2.weight"], [20, 8], [([10 * rank, 0], [10, 8])], "S(0)")
        for key in ("embedding_bags.t0.canonical_cores.1", "embedding_bags.t0.canonical_cores.2",
                    "embedding_bags.t1.canonical_cores.1"):
            assert model[key]["type"] == "Tensor", (key, model[key])  # replicated inner cores stay plain
        _check_dtensor(optim["embedding_bags.t0.canonical_cores.0"]["t0.cores.0.momentum1"], [1, 6, 2, 3],
                       [([0, 3 * rank, 0, 0], [1, 3, 2, 3])], "S(1)")
        _check_dtensor(optim["embedding_bags.t2.weight"]["t2.momentum1"], [20, 8], [([10 * rank, 0], [10, 8])], "S(0)")
        assert optim["embedding_bags.t0.canonical_cores.1"]["t0.cores.1.momentum1"]["type"] == "Tensor"
        # CW with DTensor output: t0 columns (q_1 slices) on ranks [1, 0]; t1 on rank 1 only (empty on rank 0)
        model, optim = res["cw_dt"]["model"], res["cw_dt"]["optim"]
        _check_dtensor(model["embedding_bags.t0.canonical_cores.0"], [1, 6, 2, 3], [([0, 0, 1 - rank, 0], [1, 6, 1, 3])], "S(2)")
        _check_dtensor(model["embedding_bags.t1.canonical_cores.0"], [1, 4, 4, 3],
                       [([0, 0, 0, 0], [1, 4, 4, 3])] if rank == 1 else [], "S(2)")
        _check_dtensor(model["embedding_bags.t2.weight"], [20, 8], [([0, 4 * rank], [20, 4])], "S(1)")
        _check_dtensor(optim["embedding_bags.t0.canonical_cores.0"]["t0.cores.0.momentum1"], [1, 6, 2, 3],
                       [([0, 0, 1 - rank, 0], [1, 6, 1, 3])], "S(2)")
        # ShardedTensor output is unchanged
        st = res["rw_st"]
        assert st["model"]["embedding_bags.t0.canonical_cores.0"]["type"] == "ShardedTensor", st
        assert st["optim"]["embedding_bags.t0.canonical_cores.0"]["t0.cores.0.momentum1"]["type"] == "ShardedTensor"
        # row-wise Adagrad: [p_1] state of the first core, Shard(0) by rows
        optim = res["rowwise_rw_dt"]["optim"]
        _check_dtensor(optim["embedding_bags.t0.canonical_cores.0"]["t0.cores.0.momentum1"], [6], [([3 * rank], [3])], "S(0)")
        _check_dtensor(optim["embedding_bags.t2.weight"]["t2.momentum1"], [20], [([10 * rank], [10])], "S(0)")
        assert "laid out for another plan" in res["mislaid_msg"] and "nothing was loaded" in res["mislaid_msg"], res
        assert "embedding_bags.t0.canonical_cores.0" in res["mislaid_msg"], res["mislaid_msg"]
        assert res["mislaid_unchanged"], res
        # row-wise Adagrad, CW: t1's [p_1] state held by its owner (rank 1), a one-piece tensor on both ranks
        t1_state = res["rowwise_lone_cw"]["optim"]["embedding_bags.t1.canonical_cores.0"]["t1.cores.0.momentum1"]
        assert t1_state == {"type": "ShardedTensor", "shape": [4], "pieces": [([0], [4])] if rank == 1 else []}, t1_state
        assert res["regular_dtensor"] == ([True] if rank == 1 else []), res["regular_dtensor"]
        assert res["one_rank"] == ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0] if rank == 1 else [0.0] * 6), res["one_rank"]
    (res,) = run_multiprocess(_world1_worker, world_size=1, ckpt_dir=str(tmp_path))
    assert max(res["errs"].values()) < TOL, res["errs"]
    _check_dtensor(res["cw_dt"]["model"]["embedding_bags.t0.canonical_cores.0"], [1, 6, 2, 3],
                   [([0, 0, 0, 0], [1, 6, 2, 3])], "S(2)")
