"""Where one training step's GPU time goes: kernels, and the idle gaps between them.

Profiles back-to-back steps (no synchronisation between them, as a training loop runs)
of the TT module (fused SGD) and of ``nn.EmbeddingBag(sparse=True)`` + SGD, eagerly and,
for TT, as a CUDA-graph replay. Per step it reports the host time to issue the step, the
GPU span from its first to its next step's first kernel, the union of the GPU's busy
time inside that span, and the idle rest; then the kernels of the median step with the
gap before each. A span much longer than the busy time is a step whose GPU waits between
kernels (launch latency, stream waits, or a host that issues too slowly).

The profiler slows the host's launches down (CUPTI's callbacks), so an eager step's span
here is longer than in a plain loop (``bench_host_overhead.py`` times those); its kernels'
durations and the graph replay's timeline are what this script is for: the replay has no
host in its path, so its timeline is the step's GPU critical path.

Example::

    python benchmarks/bench_step_timeline.py --batch-size 512 --pooling-factor 20
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host_overhead import add_step_args  # noqa: E402
from bench_tt_embedding_bag import IdSource, capture_step, dense_step_of  # noqa: E402

log = logging.getLogger("bench_step_timeline")


@dataclass
class GpuEvent:
    name: str
    start_us: float
    end_us: float
    stream: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(ap)
    ap.add_argument("--dist", default="uniform", choices=["uniform", "zipf"])
    ap.add_argument("--steps", type=int, default=20, help="profiled steps per mode")
    ap.add_argument("--modes", default="tt,tt_graph,dense", help="comma-separated: tt, tt_graph, dense")
    return ap.parse_args(argv)


def gpu_events(prof: torch.profiler.profile) -> list[GpuEvent]:
    """Every kernel, memset and memcpy the profiler saw, by start time."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA or _is_annotation(e):
            continue
        start = e.start_ns() / 1e3
        out.append(GpuEvent(e.name(), start, start + e.duration_ns() / 1e3, e.device_resource_id()))
    return sorted(out, key=lambda ev: ev.start_us)


def _is_annotation(e: object) -> bool:
    """A record_function range mirrored on the GPU's timeline (not work the GPU did)."""
    if getattr(e, "is_user_annotation", lambda: False)():
        return True
    return "annotation" in str(getattr(e, "activity_type", lambda: "")())


def busy_us(events: list[GpuEvent], lo: float, hi: float) -> float:
    """Length of the union of the events' intervals inside [lo, hi)."""
    total, end = 0.0, lo
    for ev in events:
        s, e = max(ev.start_us, end), min(ev.end_us, hi)
        if e > s:
            total += e - s
            end = e
    return total


def profile_steps(step: Callable[[], object], steps: int) -> tuple[list[GpuEvent], list[float]]:
    """GPU events of ``steps`` back-to-back calls, and each call's host time (us)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function("timeline_step"):
                step()
        torch.cuda.synchronize()
    host = [e.cpu_time_total for e in prof.events() if e.name == "timeline_step"]
    return gpu_events(prof), host


def step_starts(events: list[GpuEvent], steps: int) -> list[float]:
    """Start of every step: the first event's name, if it occurs once per step."""
    first = events[0].name
    starts = [ev.start_us for ev in events if ev.name == first]
    if len(starts) != steps:
        raise RuntimeError(f"the first kernel ({first[:60]}) ran {len(starts)} times in {steps} steps: no step marker")
    return starts


def report(mode: str, events: list[GpuEvent], host: list[float], steps: int) -> dict:
    starts = step_starts(events, steps)
    rows = []
    for a, b in itertools.pairwise(starts):  # the last step has no successor
        inside = [ev for ev in events if a <= ev.start_us < b]
        rows.append({"span": b - a, "busy": busy_us(inside, a, b), "kernels": len(inside), "start": a, "end": b})
    rows = rows[1:]  # the first step may start on an idle GPU
    median = sorted(rows, key=lambda r: r["span"])[len(rows) // 2]
    res = {
        "mode": mode,
        "host_us": statistics.median(host),
        "span_us": statistics.median(r["span"] for r in rows),
        "busy_us": statistics.median(r["busy"] for r in rows),
        "events_per_step": median["kernels"],
    }
    log.info(
        "%s: host %.1f us per step; GPU span %.1f us, busy %.1f, idle %.1f; %d GPU events per step",
        mode, res["host_us"], res["span_us"], res["busy_us"], res["span_us"] - res["busy_us"], res["events_per_step"],
    )
    log.info("| offset us | duration us | idle before us | stream | event |\n|---|---|---|---|---|")
    end = median["start"]
    for ev in events:
        if median["start"] <= ev.start_us < median["end"]:
            log.info(
                "| %.1f | %.1f | %.1f | %d | %s |",
                ev.start_us - median["start"], ev.end_us - ev.start_us, max(ev.start_us - end, 0.0), ev.stream,
                ev.name[:90],
            )
            end = max(end, ev.end_us)
    return res


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log.error("%s times CUDA steps: no CUDA device here", Path(__file__).name)
        return 2
    from torchrec_tt import OptimType, TTEmbeddingBag

    p, q, r = ([int(v) for v in s.split(",")] for s in (args.p_shapes, args.q_shapes, args.ranks))
    D, B, L = math.prod(q), args.batch_size, args.pooling_factor
    torch.manual_seed(0)
    src = IdSource(args.num_embeddings, args.dist, 1.05, "cuda", 0)
    ids, offsets = src.batch(B, L, torch.int64)
    g = torch.randn(B, D, device="cuda")
    table = TTEmbeddingBag(
        args.num_embeddings, D, p, q, r, sparse=True, optimizer=OptimType.SGD, learning_rate=0.0,
        include_last_offset=True, device="cuda",
    )
    log.info("%s, torch %s, B=%d, L=%d, %s ids", torch.cuda.get_device_name(), torch.__version__, B, L, args.dist)
    results = []
    for mode in args.modes.split(","):
        if mode == "tt":
            results.append(report(mode, *profile_steps(lambda: table(ids, offsets).backward(g), args.steps), args.steps))
        elif mode == "tt_graph":
            graph, _ = capture_step(lambda b: table(b[0], b[1]).backward(b[2]), (ids, offsets, g))
            results.append(report(mode, *profile_steps(graph.replay, args.steps), args.steps))
        elif mode == "dense":
            dense = torch.nn.EmbeddingBag(
                args.num_embeddings, D, mode="sum", sparse=True, include_last_offset=True, device="cuda"
            )
            dense_step = dense_step_of(dense, torch.optim.SGD(dense.parameters(), lr=0.0))
            results.append(report(mode, *profile_steps(functools.partial(dense_step, (ids, offsets, g)), args.steps), args.steps))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    log.info("| mode | host us/step | GPU span us/step | GPU busy us/step | GPU events/step |\n|---|---|---|---|---|")
    for res in results:
        log.info(
            "| %s | %.1f | %.1f | %.1f | %d |", res["mode"], res["host_us"], res["span_us"], res["busy_us"],
            res["events_per_step"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
