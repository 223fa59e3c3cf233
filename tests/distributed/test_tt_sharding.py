"""2-process gloo tests: every sharding type and a mixed plan against the unsharded module.

Each spawned run batches several sub-checks (the torchrec import costs ~5 s per process).
Forward outputs, core gradients (no fused optimizer) and several fused-optimizer steps must
match the unsharded ``TTEmbeddingBagCollection`` on the global batch (oracle: tt_dist_cases).
"""

from __future__ import annotations

from typing import Any

import pytest
from tt_multiprocess import run_multiprocess

pytestmark = pytest.mark.distributed

TOL = 2e-5


def _plan(kind: str, world_size: int) -> dict[str, Any]:
    from torchrec.distributed.sharding_plan import (
        column_wise,
        data_parallel,
        row_wise,
        table_row_wise,
        table_wise,
    )

    from torchrec_tt.distributed import TT_COMPUTE_KERNEL as CK

    if kind == "tw":
        return {"t0": table_wise(rank=0, compute_kernel=CK), "t1": table_wise(rank=1, compute_kernel=CK),
                "t2": table_wise(rank=1, compute_kernel=CK)}
    if kind == "rw":
        return {t: row_wise(compute_kernel=CK) for t in ("t0", "t1", "t2")}
    if kind == "cw":
        return {t: column_wise(ranks=[0, 1], compute_kernel=CK) for t in ("t0", "t1", "t2")}
    if kind == "dp":
        return {t: data_parallel() for t in ("t0", "t1", "t2")}
    if kind == "twrw":
        return {t: table_row_wise(host_index=0) for t in ("t0", "t1", "t2")}
    if kind == "mixed":
        return {"t0": row_wise(compute_kernel=CK), "t1": column_wise(ranks=[1, 0], compute_kernel=CK),
                "t2": table_wise(rank=0, compute_kernel=CK)}
    raise ValueError(kind)


# (plan, optimizer, weighted): optimizer None -> gradient check, else 3 fused steps
_OPT = {
    "sgd": ({"optimizer": "exact_sgd", "learning_rate": 0.5}, 0.5, 1e-8),
    "adagrad": ({"optimizer": "exact_adagrad", "learning_rate": 0.1, "eps": 1e-8}, 0.1, 1e-8),
    "rowwise_adagrad": ({"optimizer": "exact_row_wise_adagrad", "learning_rate": 0.1, "eps": 1e-8}, 0.1, 1e-8),
}


def _run_cases(rank: int, world_size: int, cases: list[tuple[str, str | None, bool]]) -> dict[str, dict[str, float]]:
    from tt_dist_cases import build_dmp, reference_module, train_and_compare

    results = {}
    for kind, opt, weighted in cases:
        fused, lr, eps = _OPT[opt] if opt is not None else (None, 0.0, 0.0)
        dmp, _ = build_dmp(rank, world_size, _plan(kind, world_size), fused, weighted)
        ref = reference_module(weighted)
        results[f"{kind}/{opt}/{'weighted' if weighted else 'plain'}"] = train_and_compare(
            rank, world_size, dmp, ref, opt, lr, eps, steps=0 if opt is None else 3, weighted=weighted
        )
    return results


def _check(results: list[dict[str, dict[str, float]]]) -> None:
    bad = {f"rank{r}:{case}": errs for r, res in enumerate(results) for case, errs in res.items()
           if max(errs.values()) > TOL}
    assert not bad, bad


def test_table_column_data_parallel() -> None:
    cases = [
        ("tw", None, False), ("tw", "adagrad", True), ("tw", "rowwise_adagrad", False),
        ("cw", None, True), ("cw", "sgd", False), ("cw", "rowwise_adagrad", False),
        ("dp", None, False), ("dp", "adagrad", False),
    ]
    _check(run_multiprocess(_run_cases, world_size=2, cases=cases))


def test_row_wise_table_row_wise_mixed() -> None:
    cases = [
        ("rw", None, True), ("rw", "rowwise_adagrad", False), ("rw", "sgd", True),
        ("twrw", None, False), ("twrw", "adagrad", False),
        ("mixed", None, False), ("mixed", "adagrad", True),
    ]
    _check(run_multiprocess(_run_cases, world_size=2, cases=cases))
