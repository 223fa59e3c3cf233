#!/usr/bin/env python3
"""Train DLRM / DLRM-DCN with Tensor-Train compressed embedding tables (torchrec_tt).

Launch with torchrun (one process per GPU, or N CPU processes on gloo)::

    torchrun --nproc_per_node 2 examples/train_dlrm.py --yaml_config configs/dlrm_small.yaml

or let the script start the local workers itself::

    python examples/train_dlrm.py --nproc 2 --yaml_config configs/dlrm_small.yaml

Options come from the dataclasses in ``torchrec_tt/training/config.py`` (the
defaults), overridden by ``--yaml_config FILE``, overridden by flags
(``--batch_size 1024 --compression none ...``; ``--help`` lists them all).
Run the same command again after a crash / ``kill``: it resumes from the newest
checkpoint in ``<out_dir>/checkpoints`` (``--checkpoint_every N``).
"""

from __future__ import annotations

import os
import sys
import uuid

from torch.distributed.elastic.multiprocessing.errors import record

from torchrec_tt.training.config import parse_config


def _launch_local_workers(nproc: int, argv: list[str]) -> None:
    """Start ``nproc`` workers of this script on this host (what ``torchrun --nproc_per_node`` does)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    elastic_launch(config, entrypoint=sys.executable)(os.path.abspath(__file__), *argv)


@record
def main(argv: list[str] | None = None) -> None:
    """Parse the configuration, then train here or start the local workers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(argv)
    launched = "LOCAL_RANK" in os.environ
    if cfg.train.nproc > 1 and not launched:
        _launch_local_workers(cfg.train.nproc, argv)
        summary_path = os.path.join(cfg.train.out_dir, "summary.json")
        if os.path.exists(summary_path):
            print(f"summary: {summary_path}")
        return
    if launched and cfg.train.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) != cfg.train.nproc:
        raise SystemExit(
            f"--nproc {cfg.train.nproc} but this worker was launched as one of WORLD_SIZE={os.environ['WORLD_SIZE']}; "
            "drop --nproc when using torchrun"
        )
    from torchrec_tt.training.trainer import format_summary, run

    summary = run(cfg)
    if summary is not None:
        print(format_summary(summary), flush=True)


if __name__ == "__main__":
    main()
