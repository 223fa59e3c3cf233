"""DCP round trip and resharding TW -> RW -> CW across world sizes 2 and 1, optimizer state included."""

from __future__ import annotations

import pytest
import torch
from tt_multiprocess import run_multiprocess

pytestmark = pytest.mark.distributed

FUSED = {"optimizer": "exact_adagrad", "learning_rate": 0.1, "eps": 1e-8}
FUSED_RW = {"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.1, "eps": 1e-8}


def _plans(world_size):
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    from torchrec_tt.distributed import TT_COMPUTE_KERNEL as CK

    last = world_size - 1
    return {
        "tw": {"t0": table_wise(rank=0, compute_kernel=CK), "t1": table_wise(rank=last, compute_kernel=CK),
               "t2": table_wise(rank=last, compute_kernel=CK)},
        "rw": {t: row_wise(compute_kernel=CK) for t in ("t0", "t1", "t2")},
        "cw": {t: column_wise(ranks=sorted({last, 0}, reverse=True), compute_kernel=CK) for t in ("t0", "t1", "t2")},
    }


def _step(dmp, rank, world_size, seed, batch=4, train=True):
    from tt_dist_cases import global_batch, loss_coefficients, make_kjt

    keys, ids, wts = global_batch(seed, batch * world_size, False)
    lo, hi = rank * batch, (rank + 1) * batch
    out = dmp(make_kjt(keys, ids, wts, lo, hi)).wait().to_dict()
    if train:
        coef = loss_coefficients(seed, list(out), batch * world_size, 8)
        sum((out[n] * coef[n][lo:hi]).sum() for n in sorted(out)).backward()
    return {n: v.detach() for n, v in out.items()}


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _reshard_worker(rank, world_size, ckpt_dir, fused):
    from tt_dist_cases import build_dmp

    from torchrec_tt.distributed.checkpoint import load_checkpoint, save_checkpoint

    plans = _plans(world_size)
    res = {}
    tw, _ = build_dmp(rank, world_size, plans["tw"], fused, False, seed=0)
    for s in range(2):
        _step(tw, rank, world_size, s)
    save_checkpoint(tw, f"{ckpt_dir}/tw", tw.fused_optimizer)
    rw, _ = build_dmp(rank, world_size, plans["rw"], fused, False, seed=123)
    load_checkpoint(rw, f"{ckpt_dir}/tw", rw.fused_optimizer)
    res["tw->rw forward"] = _max_diff(_step(tw, rank, world_size, 7, train=False), _step(rw, rank, world_size, 7, train=False))
    # one more training step on both: equal only if the optimizer state was restored too
    _step(tw, rank, world_size, 3)
    _step(rw, rank, world_size, 3)
    res["tw->rw after step"] = _max_diff(_step(tw, rank, world_size, 8, train=False), _step(rw, rank, world_size, 8, train=False))
    save_checkpoint(rw, f"{ckpt_dir}/rw", rw.fused_optimizer)
    cw, _ = build_dmp(rank, world_size, plans["cw"], fused, False, seed=7)
    load_checkpoint(cw, f"{ckpt_dir}/rw", cw.fused_optimizer)
    _step(rw, rank, world_size, 4)
    _step(cw, rank, world_size, 4)
    res["rw->cw after step"] = _max_diff(_step(rw, rank, world_size, 9, train=False), _step(cw, rank, world_size, 9, train=False))
    save_checkpoint(cw, f"{ckpt_dir}/cw", cw.fused_optimizer)
    torch.save(_step(cw, rank, world_size, 10, train=False), f"{ckpt_dir}/expected_{world_size}_{rank}.pt")
    return res


def _load_elsewhere_worker(rank, world_size, ckpt_dir, fused, saved_world_size):
    """Load the other world size's checkpoint under each plan and compare with its saved outputs."""
    from tt_dist_cases import build_dmp

    from torchrec_tt.distributed.checkpoint import load_checkpoint

    expected = [torch.load(f"{ckpt_dir}/expected_{saved_world_size}_{r}.pt") for r in range(saved_world_size)]
    full = {n: torch.cat([e[n] for e in expected]) for n in expected[0]}
    b = full["f0"].shape[0] // world_size
    mine = {n: v[rank * b:(rank + 1) * b] for n, v in full.items()}
    res = {}
    for kind, plan in _plans(world_size).items():
        dmp, _ = build_dmp(rank, world_size, plan, fused, False, seed=99)
        load_checkpoint(dmp, f"{ckpt_dir}/cw", dmp.fused_optimizer)
        res[f"cw(W={saved_world_size}) -> {kind}(W={world_size})"] = _max_diff(_step(dmp, rank, world_size, 10, batch=b, train=False), mine)
    return res


def _mismatch_worker(rank, world_size, ckpt_dir):
    import tt_dist_cases
    from tt_dist_cases import build_dmp, tables

    from torchrec_tt.distributed.checkpoint import load_checkpoint

    original = tt_dist_cases.tables

    def other_ranks(aligned=True):
        t = original(aligned)
        t[0] = type(t[0])(name="t0", num_embeddings=60, embedding_dim=8, feature_names=["f0", "f1"],
                          tt_p_shapes=[6, 5, 2], tt_q_shapes=[2, 2, 2], tt_ranks=[4, 2])
        return t

    tt_dist_cases.tables = other_ranks
    try:
        dmp, _ = build_dmp(rank, world_size, _plans(world_size)["rw"], FUSED, False, seed=5)
    finally:
        tt_dist_cases.tables = original
    before = {k: v.detach().clone() for k, v in dmp.named_parameters()}
    try:
        load_checkpoint(dmp, f"{ckpt_dir}/cw", dmp.fused_optimizer)
    except ValueError as e:
        msg = str(e)
    else:
        msg = ""
    unchanged = all(torch.equal(before[k], v) for k, v in dmp.named_parameters())
    # the module's own load_state_dict also refuses a mismatched full tensor, naming the table
    try:
        dmp.load_state_dict({"embedding_bags.t0.canonical_cores.0": torch.zeros(1, 6, 2, 3)}, strict=False)
    except RuntimeError as e:
        msg2 = str(e)
    else:
        msg2 = ""
    del tables
    return {"msg": msg, "msg2": msg2, "unchanged": unchanged}


_VARIANTS = {"adagrad": FUSED, "rowwise_adagrad": FUSED_RW}


def _world2_worker(rank, world_size, ckpt_dir):
    res = {name: _reshard_worker(rank, world_size, f"{ckpt_dir}/{name}", fused) for name, fused in _VARIANTS.items()}
    res["mismatch"] = _mismatch_worker(rank, world_size, f"{ckpt_dir}/adagrad")
    return res


def _world1_worker(rank, world_size, ckpt_dir):
    return {name: _load_elsewhere_worker(rank, world_size, f"{ckpt_dir}/{name}", fused, 2) for name, fused in _VARIANTS.items()}


def test_dcp_reshard_tw_rw_cw_across_world_sizes_and_mismatch_errors(tmp_path):
    for res in run_multiprocess(_world2_worker, world_size=2, ckpt_dir=str(tmp_path)):
        mismatch = res.pop("mismatch")
        for name, errs in res.items():
            assert max(errs.values()) < 2e-5, (name, errs)
        assert "embedding_bags.t0.canonical_cores" in mismatch["msg"] and "nothing was loaded" in mismatch["msg"], mismatch
        assert "table 't0'" in mismatch["msg2"] and "nothing was loaded" in mismatch["msg2"], mismatch
        assert mismatch["unchanged"], mismatch
    (res,) = run_multiprocess(_world1_worker, world_size=1, ckpt_dir=str(tmp_path))
    for name, errs in res.items():
        assert max(errs.values()) < 2e-5, (name, errs)
