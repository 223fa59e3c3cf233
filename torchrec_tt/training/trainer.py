"""The distributed train / eval loop of the DLRM job.

One call of :func:`run` per worker process (``torchrun`` or ``--nproc``):

1. process group (NCCL on GPU, gloo on CPU), device, threads;
2. tables (TT where configured), DLRM / DLRM-DCN, DMP sharding (TT sharder + planner),
   fused embedding optimizer + dense optimizer;
3. resume from the newest complete DCP checkpoint, if any;
4. training through torchrec's ``TrainPipelineSparseDist`` (input dist of batch
   ``i+1`` overlaps forward/backward of batch ``i``), periodic metrics rows
   (``metrics.csv`` / ``metrics.jsonl``), periodic validation (AUC, log loss) and
   checkpoints;
5. final validation / test and ``summary.json``: embedding size uncompressed vs
   stored, compression ratio, samples/s, AUC.

Checkpoints live in ``<checkpoint_dir>/step_<N>``; a checkpoint is written to
``step_<N>.tmp`` and renamed only after every rank finished, so a run killed at
any moment (even ``kill -9``) restarts from the last complete one. The data
stream restarts at the first batch the checkpointed model had not consumed.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_tt.modules.tt_cache import cache_statistics
from torchrec_tt.training.config import ExperimentConfig
from torchrec_tt.training.data import (
    InMemoryRecDataset,
    SyntheticCriteoDataset,
    make_dataloader,
    make_dataset,
    prepare_data,
    table_sizes,
)
from torchrec_tt.training.model import (
    build_model,
    build_optimizer,
    build_tables,
    dense_parameter_count,
    embedding_size_report,
    make_sharders,
    shard_model,
    sparse_collection,
)

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "MetricsWriter", "evaluate", "run"]

METRIC_COLUMNS = [
    "time", "split", "step", "epoch", "samples", "loss", "auc", "samples_per_s", "data_wait_frac", "elapsed_s",
]  # fmt: skip


# ----------------------------------------------------------------------------- process group
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(device_pref: str) -> tuple[int, int, int, torch.device, str]:
    """Init the default process group from torchrun's variables (or a 1-process group)."""
    if "RANK" not in os.environ:  # plain `python train_dlrm.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return rank, world, local_world, device, backend


# ----------------------------------------------------------------------------- metrics
class MetricsWriter:
    """Rank 0's metrics: one row per log/eval event in ``metrics.csv`` and ``metrics.jsonl``.

    On resume from step ``s`` the rows of steps ``> s`` (written after that
    checkpoint by the run that died) are dropped, so the files read as one run.

    Args:
        out_dir (Path): directory of the files.
        resume_step (int, optional): the step the run resumes from (None: fresh run,
            existing files are replaced).
        enabled (bool): False on ranks other than 0.
    """

    def __init__(self, out_dir: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.csv_path, self.jsonl_path = out_dir / "metrics.csv", out_dir / "metrics.jsonl"
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step is not None and self.jsonl_path.exists():
            for line in self.jsonl_path.read_text().splitlines():
                row = json.loads(line)
                if int(row.get("step", 0)) <= resume_step:
                    kept.append(row)
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        with open(self.jsonl_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, **row: Any) -> None:
        """Append one row (unknown columns go to the JSONL file only)."""
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore").writerow(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """DCP checkpoints in ``root/step_<N>``, written atomically (tmp dir + rename), newest ``keep`` kept.

    Assumes ``root`` is on a file system shared by all ranks (one host, or NFS).

    Args:
        root (Path): checkpoint directory.
        keep (int): complete checkpoints to keep.
        rank (int): this rank (rank 0 renames and prunes).
    """

    def __init__(self, root: Path, keep: int, rank: int) -> None:
        self.root, self.keep, self.rank = root, keep, rank

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints ``(step, path)``, oldest first."""
        if not self.root.exists():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / "meta.json").exists():
                out.append((int(p.name[5:]), p))
        return sorted(out)

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint, if any."""
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own (sharded) ``state``."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        dist.barrier()
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Collective: fill ``state`` in place from ``path``; returns its ``meta.json``."""
        dcp.load(state, checkpoint_id=str(path))
        return json.loads((path / "meta.json").read_text())


def _app_state(dmp: nn.Module, optimizer: CombinedOptimizer) -> dict[str, Any]:
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict()}


# ----------------------------------------------------------------------------- evaluation
class _TimedIterator:
    """Wraps a batch iterator and accumulates the time spent waiting for batches."""

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self.wait_s = 0.0

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait_s += time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, max_batches: int = 0) -> dict[str, float]:
    """Log loss and AUC of ``model`` over ``loader`` (all ranks; results are global).

    Args:
        model (nn.Module): the (unpipelined) DMP of a ``DLRMTrain``.
        loader (iterable): this rank's batches (every rank the same count).
        device (torch.device): where batches go.
        max_batches (int): stop after this many batches (0: all).

    Returns:
        dict: ``loss`` (mean BCE), ``auc`` (torchmetrics ``BinaryAUROC``), ``samples``.
    """
    from torchmetrics.classification import BinaryAUROC

    was_training = model.training
    model.eval()
    auroc = BinaryAUROC().to(device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device, non_blocking=True)
        _, (_, logits, labels) = model(batch)
        logits = logits.float()
        loss_sum[0] += nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum").double()
        loss_sum[1] += labels.numel()
        auroc.update(torch.sigmoid(logits), labels.long())
    dist.all_reduce(loss_sum)
    auc = float(auroc.compute())
    model.train(was_training)
    return {"loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)), "auc": auc, "samples": int(loss_sum[1])}


def _eval_split(
    cfg: ExperimentConfig, pipeline: TrainPipelineSparseDist | None, dmp: nn.Module, split: str,
    rank: int, world: int, device: torch.device,
) -> dict[str, float]:
    model = pipeline.detach() if pipeline is not None else dmp
    loader = make_dataloader(cfg.data, split, rank, world, pin_memory=device.type == "cuda")
    result = evaluate(model, loader, device, cfg.train.eval_batches)
    if pipeline is not None:
        pipeline.attach(model)
    return result


def _progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar, or a no-op one where tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:  # e.g. a GPU machine without it: no bar

        class _NoBar:
            def update(self, n: int = 1) -> None: ...
            def set_postfix(self, **kw: Any) -> None: ...
            def close(self) -> None: ...

        return _NoBar()
    return tqdm(**kwargs)


def _write_eval(
    metrics: MetricsWriter, split: str, step: int, epoch: float | None, res: dict[str, float], t_start: float
) -> None:
    metrics.write(split=split, step=step, epoch=epoch, samples=res["samples"], loss=round(res["loss"], 6),
                  auc=round(res["auc"], 6), elapsed_s=round(time.time() - t_start, 2))


def _validate(
    cfg: ExperimentConfig, pipeline: TrainPipelineSparseDist, dmp: nn.Module, rank: int, world: int,
    device: torch.device, step: int, epoch: float | None, metrics: MetricsWriter, selection: dict[str, Any],
    t_start: float,
) -> dict[str, dict[str, float]]:
    """Validation (and test with ``test_with_val``); keeps the best validation in ``selection``."""
    out = {"val": _eval_split(cfg, pipeline, dmp, "val", rank, world, device)}
    if cfg.train.test_with_val:
        out["test"] = _eval_split(cfg, pipeline, dmp, "test", rank, world, device)
    for split, res in out.items():
        _write_eval(metrics, split, step, epoch, res, t_start)
    selection["last"] = out
    if "best_val" not in selection or out["val"]["auc"] > selection["best_val"]["auc"]:
        selection.update(best_val=out["val"], best_step=step, best_test=out.get("test"))
    return out


class _Throughput:
    """Samples/s of the logged windows, without evaluation/checkpoint pauses; window 1 is warm-up."""

    def __init__(self, start: float) -> None:
        self.window_start, self.paused = start, 0.0
        self.windows, self.timed_samples, self.timed_s = 0, 0, 0.0

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def close_window(self, now: float, samples: int) -> float:
        """End the current window; returns its samples/s."""
        dt = max(now - self.window_start - self.paused, 1e-9)
        if self.windows > 0:
            self.timed_samples += samples
            self.timed_s += dt
        self.windows += 1
        self.window_start, self.paused = now, 0.0
        return samples / dt

    def overall(self) -> float | None:
        """Samples/s over all windows after the first (None with fewer than two windows)."""
        return round(self.timed_samples / self.timed_s, 1) if self.timed_s > 0 else None


def _batches_per_epoch(dataset: Any) -> int | None:
    """Batches per pass of a finite training set (None for streams)."""
    if isinstance(dataset, InMemoryRecDataset):
        return dataset.batches_per_epoch
    inner = getattr(dataset, "ds", dataset)  # _Repeat wraps the Criteo datasets
    if isinstance(dataset, SyntheticCriteoDataset) or not hasattr(inner, "__len__"):
        return None
    try:
        return len(inner) or None
    except TypeError:
        return None


def _oracle_auc(cfg: ExperimentConfig, world: int, split: str) -> float | None:
    """AUC of the planted logits on a synthetic split (the best any model can do), on rank 0."""
    if cfg.data.dataset != "synthetic":
        return None
    from torchmetrics.functional.classification import binary_auroc

    ds = make_dataset(cfg.data, split, 0, world)
    assert isinstance(ds, SyntheticCriteoDataset)
    units = ds.num_batches * world if ds.num_batches is not None else 0
    if cfg.train.eval_batches:
        units = min(units, cfg.train.eval_batches * world)
    logits, labels = [], []
    for u in range(units):
        batch, logit = ds.generate(u)
        logits.append(logit)
        labels.append(batch.labels)
    return float(binary_auroc(torch.sigmoid(torch.cat(logits)), torch.cat(labels).long()))


# ----------------------------------------------------------------------------- run
def _configure_logging(rank: int) -> None:
    """Warnings from everyone; this package's INFO lines from rank 0 only (fbgemm logs INFO to root)."""
    logging.basicConfig(level=logging.WARNING, format=f"[rank{rank}] %(asctime)s %(name)s %(levelname)s: %(message)s",
                        force=True)
    logging.getLogger("torchrec_tt").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _comm_codecs_registry(cfg: ExperimentConfig, tables: list[Any], device: torch.device) -> dict[str, Any] | None:
    """The ``qcomm_codecs_registry`` of ``--comm_codec`` (None for ``none``)."""
    if cfg.train.comm_codec == "none":
        return None
    from torchrec_tt.distributed.comm_codec import make_comm_codecs_registry

    dims = [t.embedding_dim for t in tables]
    return make_comm_codecs_registry(cfg.train.comm_codec, device, embedding_dims=dims, **cfg.train.comm_codec_options)


def _comm_policies(registry: dict[str, Any] | None) -> list[Any]:
    if registry is None:
        return []
    from torchrec_tt.distributed.comm_codec import comm_codec_policies

    return comm_codec_policies(registry)


def _comm_stats(policy: Any) -> dict[str, Any]:
    """The codec counters worth a metrics row (reads device counters: call at log time)."""
    s = policy.summary()
    keys = ("bits", "error_bound", "relative_target", "calls", "wire_bytes", "fp32_bytes", "compression_vs_fp32",
            "violations", "nonfinite", "max_abs", "max_guaranteed_error", "block_max_quantiles")
    return {k: s[k] for k in keys if k in s}


def run(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Train and evaluate on this worker process (call once per rank).

    Args:
        cfg (ExperimentConfig): the job.

    Returns:
        dict or None: the summary on rank 0 (also in ``<out_dir>/summary.json``), None elsewhere.
    """
    t_start = time.time()
    rank, world, local_world, device, backend = _init_distributed(cfg.train.device)
    _configure_logging(rank)
    try:
        return _run(cfg, rank, world, local_world, device, backend, t_start)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(
    cfg: ExperimentConfig, rank: int, world: int, local_world: int, device: torch.device, backend: str, t_start: float
) -> dict[str, Any] | None:
    tc = cfg.train
    if device.type == "cpu":
        torch.set_num_threads(tc.num_threads or max(1, (os.cpu_count() or 1) // local_world))
    torch.set_float32_matmul_precision(tc.float32_matmul_precision)
    out_dir = Path(tc.out_dir)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        prepare_data(cfg.data)
    dist.barrier()

    # ---- model
    features, sizes, num_dense = table_sizes(cfg.data)
    tables = build_tables(features, sizes, cfg.model, row_wise_shards=world if tc.sharding in ("row_wise", "table_row_wise") else 0)
    sizes_report = embedding_size_report(tables)
    torch.manual_seed(tc.seed)
    model = build_model(tables, num_dense, cfg.model, device)
    if device.type == "cuda":  # after build_model: it checks for FBGEMM's own CUDA kernels
        from torchrec_tt.distributed.fbgemm_cuda_fallback import register_fbgemm_cuda_fallbacks

        register_fbgemm_cuda_fallbacks()
    registry = _comm_codecs_registry(cfg, tables, device)
    comm_policies = _comm_policies(registry)  # error-bounded codecs: stepped every iteration below
    sharders = make_sharders(model, cfg.optim, registry)
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    dmp: DistributedModelParallel = shard_model(
        model, env, device, sharders, tc, cfg.optim, cfg.data.batch_size, local_world
    )
    optimizer = build_optimizer(dmp, cfg.optim)
    if rank == 0:
        logger.info(
            "%d ranks (%s, %s); %d tables, %d TT; embeddings %.1f MB uncompressed, %.2f MB stored (%.1fx); dense %d params",
            world, device.type, backend, len(tables), sizes_report.tt_tables, sizes_report.uncompressed_params * 4 / 2**20,
            sizes_report.stored_params * 4 / 2**20, sizes_report.compression_ratio, dense_parameter_count(dmp),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # ---- resume
    ckpt = CheckpointManager(tc.resolved_checkpoint_dir, tc.keep_checkpoints, rank)
    start_step, samples_seen, resumed_from, data_start = 0, 0, None, 0
    latest = ckpt.latest() if tc.resume else None
    if latest is not None:
        state = _app_state(dmp, optimizer)
        meta = ckpt.load(latest[1], state)
        dmp.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        start_step, samples_seen, resumed_from = int(meta["step"]), int(meta["samples"]), str(latest[1])
        saved_world = int(meta.get("world_size", world))
        if rank == 0:
            logger.info("resumed from %s (step %d, %d samples)", latest[1], start_step, samples_seen)
            if saved_world != world:
                logger.warning(
                    "checkpoint written by %d ranks, resuming on %d: the model is resharded, the data stream "
                    "restarts at global batch %d (exact for the synthetic stream when divisible)",
                    saved_world, world, start_step * saved_world // world,
                )
        data_start = start_step * saved_world // world
    metrics = MetricsWriter(out_dir, start_step if latest is not None else None, enabled=rank == 0)

    # ---- data
    epochs = None if tc.train_steps else tc.epochs
    train_loader = make_dataloader(
        cfg.data, "train", rank, world, start_batch=data_start, epochs=epochs, pin_memory=device.type == "cuda"
    )
    per_epoch = _batches_per_epoch(train_loader.dataset)
    total_steps: int | None = tc.train_steps or None
    if total_steps is None:
        try:
            total_steps = start_step + len(train_loader.dataset)  # type: ignore[arg-type]
        except TypeError:  # a stream of unknown length (criteo_tsv): until it ends
            total_steps = None
    batches = _TimedIterator(iter(train_loader))

    def epoch_of(s: int) -> float | None:
        return round(s / per_epoch, 4) if per_epoch else None

    # ---- train
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
    bar = _progress_bar(total=total_steps, initial=start_step, disable=rank != 0 or not tc.progress_bar, desc="train",
                        dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    window = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's loss sum, samples since the last log
    clock = _Throughput(time.perf_counter())
    wait_mark = batches.wait_s
    step, last_eval_step = start_step, -1
    eval_results: dict[str, dict[str, float]] = {}
    selection: dict[str, Any] = {}  # best validation so far (and the test result there)

    def global_samples() -> int:
        pending = window[1].clone()
        dist.all_reduce(pending)
        return samples_seen + int(pending)

    dmp.train()
    while total_steps is None or step < total_steps:
        try:
            loss, _, labels = pipeline.progress(batches)  # DLRMTrain: (loss, logits, labels), detached
        except StopIteration:
            break
        step += 1
        bar.update(1)
        for policy in comm_policies:
            policy.step(step)
        window[0] += loss.double() * labels.numel()
        window[1] += labels.numel()
        if step % tc.log_every == 0 or step == total_steps:
            dist.all_reduce(window)
            n = int(window[1])
            samples_seen += n
            now = time.perf_counter()
            wait_frac = (batches.wait_s - wait_mark) / max(now - clock.window_start - clock.paused, 1e-9)
            row = {
                "split": "train", "step": step, "epoch": epoch_of(step), "samples": samples_seen,
                "loss": round(float(window[0] / window[1].clamp(min=1)), 6),
                "samples_per_s": round(clock.close_window(now, n), 1), "data_wait_frac": round(wait_frac, 4),
                "elapsed_s": round(time.time() - t_start, 2),
            }
            if comm_policies:  # this rank's codec counters (metrics.jsonl only)
                row["comm"] = {p.name: _comm_stats(p) for p in comm_policies}
            metrics.write(**row)
            bar.set_postfix(loss=row["loss"], sps=row["samples_per_s"])
            window.zero_()
            wait_mark = batches.wait_s
        if tc.eval_every and step % tc.eval_every == 0 and step != total_steps:
            t0 = time.perf_counter()
            _validate(cfg, pipeline, dmp, rank, world, device, step, epoch_of(step), metrics, selection, t_start)
            last_eval_step = step
            clock.pause(time.perf_counter() - t0)  # evaluation time is not training time
        if tc.checkpoint_every and step % tc.checkpoint_every == 0:
            t0 = time.perf_counter()
            ckpt.save(step, _app_state(dmp, optimizer), {"step": step, "samples": global_samples(), "world_size": world})
            clock.pause(time.perf_counter() - t0)
        if tc.simulate_failure_at_step and step == tc.simulate_failure_at_step and rank == 0:
            logger.warning("simulate_failure_at_step=%d: rank 0 kills itself (SIGKILL)", step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if tc.train_steps and step < tc.train_steps:
        logger.warning("training data ran out after %d of %d steps", step, tc.train_steps)
    samples_seen = global_samples()

    # ---- final evaluation, checkpoint, summary
    if last_eval_step == step:
        eval_results.update(selection["last"])
    elif tc.val_at_end:
        eval_results.update(
            _validate(cfg, pipeline, dmp, rank, world, device, step, epoch_of(step), metrics, selection, t_start)
        )
    if tc.test_at_end and "test" not in eval_results:
        eval_results["test"] = _eval_split(cfg, pipeline, dmp, "test", rank, world, device)
        _write_eval(metrics, "test", step, epoch_of(step), eval_results["test"], t_start)
    if tc.checkpoint_at_end and (not tc.checkpoint_every or step % tc.checkpoint_every):
        ckpt.save(step, _app_state(dmp, optimizer), {"step": step, "samples": samples_seen, "world_size": world})
    if rank != 0:
        return None
    summary: dict[str, Any] = {
        "dataset": cfg.data.dataset, "model": cfg.model.model_type, "compression": cfg.model.compression,
        "embedding_module": type(sparse_collection(model)).__name__,
        "world_size": world, "device": device.type, "steps": step, "resumed_from": resumed_from,
        "samples_seen": samples_seen, "global_batch_size": cfg.data.batch_size * world,
        "train_samples_per_s": clock.overall(),
        **sizes_report.to_dict(),
        "dense_params": dense_parameter_count(dmp),
        **{f"{split}_auc": round(res["auc"], 6) for split, res in eval_results.items()},
        **{f"{split}_loss": round(res["loss"], 6) for split, res in eval_results.items()},
        "wall_s": round(time.time() - t_start, 1),
        "comm_codec": tc.comm_codec,
        "tables": sizes_report.per_table,
    }
    if comm_policies:
        summary["comm_codec_stats"] = {p.name: _comm_stats(p) for p in comm_policies}
    caches = cache_statistics(dmp)  # rank 0's shards (a host sync per cache, once)
    if caches:
        summary["cache_statistics_rank0"] = caches
    if tc.test_with_val and "best_val" in selection:
        summary["best_val_step"] = selection["best_step"]
        summary["best_val_auc"] = round(selection["best_val"]["auc"], 6)
        summary["test_auc_at_best_val"] = round(selection["best_test"]["auc"], 6)
    oracle = _oracle_auc(cfg, world, "test") if tc.test_at_end else None
    if oracle is not None:
        summary["test_oracle_auc"] = round(oracle, 6)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable closing summary."""
    lines = [
        f"{'=' * 20} DLRM summary ({summary['dataset']}, {summary['model']}, compression={summary['compression']}) {'=' * 20}",
        f"world size {summary['world_size']} ({summary['device']}), {summary['steps']} steps, "
        f"{summary['samples_seen']:,} samples, global batch {summary['global_batch_size']}",
        f"embeddings: {summary['embedding_params_uncompressed']:,} params uncompressed "
        f"({summary['embedding_mb_uncompressed']:.1f} MB) -> {summary['embedding_params_stored']:,} stored "
        f"({summary['embedding_mb_stored']:.2f} MB): compression {summary['compression_ratio']:.1f}x "
        f"({summary['tt_tables']} TT tables, {summary['tt_tables_compression_ratio']:.1f}x on those)",
        f"dense params {summary['dense_params']:,}",
        f"throughput {summary['train_samples_per_s']} samples/s (after the first log window)",
    ]
    for split in ("val", "test"):
        if f"{split}_auc" in summary:
            lines.append(f"{split}: AUC {summary[f'{split}_auc']:.4f}, log loss {summary[f'{split}_loss']:.4f}")
    if "test_auc_at_best_val" in summary:
        lines.append(
            f"best validation AUC {summary['best_val_auc']:.4f} at step {summary['best_val_step']}: "
            f"test AUC there {summary['test_auc_at_best_val']:.4f}"
        )
    if "test_oracle_auc" in summary:
        lines.append(f"test AUC of the planted logits (ceiling): {summary['test_oracle_auc']:.4f}")
    for name, st in summary.get("cache_statistics_rank0", {}).items():
        lines.append(
            f"cache {name} (rank 0): hit rate {st['hit_rate']:.3f} over {int(st['lookups']):,} lookups, "
            f"{int(st['populates'])} populates, {int(st['evictions']):,} evictions"
        )
    lines.append(f"wall time {summary['wall_s']} s")
    return "\n".join(lines)
