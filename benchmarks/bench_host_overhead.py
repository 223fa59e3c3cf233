"""Host (CPU) time per call of the parts of a TT training step on CUDA.

Times each part in a loop of back-to-back calls, beside the same loop for the
uncompressed ``nn.EmbeddingBag`` and for a single tiny kernel launch (the floor of any
eager op). Host time per call is the loop's wall time: the time to issue a call while the
GPU keeps up. GPU time per call is measured by events around the same loop. A part whose
GPU time exceeds its host time is GPU bound (its launches queue up ahead of the GPU); once
the launch queue is full the host waits too, and both read the same.

Example::

    python benchmarks/bench_host_overhead.py --batch-size 512 --pooling-factor 20
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tt_embedding_bag import profiled_steps  # noqa: E402

log = logging.getLogger("bench_host_overhead")


class _NoOp(torch.autograd.Function):
    """Autograd's fixed cost: a forward that allocates its (B, D) output, a backward that returns nothing."""

    @staticmethod
    def forward(ctx, leaf: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids, offsets)
        return torch.empty_like(like)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None, None]:
        return None, None, None, None


def add_step_args(ap: argparse.ArgumentParser) -> None:
    """The table (seed shapes by default) and batch of the timed step."""
    ap.add_argument("--num-embeddings", "-E", type=int, default=11_000_000)
    ap.add_argument("--p-shapes", default="200,220,250")
    ap.add_argument("--q-shapes", default="4,4,4")
    ap.add_argument("--ranks", default="32,32")
    ap.add_argument("--batch-size", "-B", type=int, default=512)
    ap.add_argument("--pooling-factor", "-L", type=int, default=20)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_args(ap)
    ap.add_argument("--iters", type=int, default=300, help="timed calls per part")
    ap.add_argument("--cache-size", type=int, default=0, help="also time the LFU-cached table with this many cached rows")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--trace", type=int, default=0, metavar="STEPS",
        help="also log where the TT module step's host time goes over this many steps: the profiler's "
        "operators and CUDA API calls by self CPU time, and Python's functions by own time (cProfile)",
    )
    return ap.parse_args(argv)


def host_us_per_call(fn: Callable[[], object], iters: int) -> dict[str, float]:
    """Wall time per call of back-to-back calls, and the GPU time per call over the same loop."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    host = time.perf_counter() - t0  # issue time (unless the launch queue filled up)
    torch.cuda.synchronize()
    res = {"host_us": host / iters * 1e6, "gpu_us": start.elapsed_time(stop) / iters * 1e3}
    res.update(issue_and_span_us(fn))
    return res


def issue_and_span_us(fn: Callable[[], object], calls: int = 24) -> dict[str, float]:
    """Medians, over ``calls`` calls issued from an idle GPU, of each call's host time and GPU span.

    Few enough calls that the launch queue never fills, so the host never waits for the GPU:
    a call whose GPU span exceeds its issue time is GPU bound, one whose span equals it
    is host bound (the GPU waited for its launches).
    """
    events = [torch.cuda.Event(enable_timing=True) for _ in range(calls + 1)]
    stamps = []
    torch.cuda.synchronize()
    for i in range(calls):
        stamps.append(time.perf_counter())
        events[i].record()
        fn()
    stamps.append(time.perf_counter())
    events[calls].record()
    torch.cuda.synchronize()
    issue = sorted(b - a for a, b in itertools.pairwise(stamps))
    span = sorted(a.elapsed_time(b) for a, b in itertools.pairwise(events))
    return {"issue_us": issue[calls // 2] * 1e6, "span_us": span[calls // 2] * 1e3}


def trace_host_time(step: Callable[[], object], steps: int, rows: int = 25) -> None:
    """Log the host time of ``steps`` calls of ``step`` by operator / CUDA API call, then by Python function."""
    import cProfile
    import pstats

    prof = profiled_steps(lambda _: step(), None, steps=steps, warmup=10)
    log.info("Profiler, %d steps, by self CPU time:\n%s", steps, prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(rows)
    log.info("cProfile, %d steps, by own time:\n%s", steps, out.getvalue())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # over the import's config
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log.error("%s times CUDA steps: no CUDA device here", Path(__file__).name)
        return 2
    from torchrec_tt import OptimType, TTEmbeddingBag
    from torchrec_tt.ops.tt_embedding_bag import tt_embedding_bag_for_backward

    dev = "cuda"
    p, q, r = ([int(v) for v in s.split(",")] for s in (args.p_shapes, args.q_shapes, args.ranks))
    D = math.prod(q)
    B, L = args.batch_size, args.pooling_factor
    torch.manual_seed(0)
    table = TTEmbeddingBag(
        args.num_embeddings, D, p, q, r, sparse=True, optimizer=OptimType.SGD, learning_rate=0.0, device=dev
    )
    ids = torch.randint(0, args.num_embeddings, (B * L,), device=dev)
    offsets = torch.arange(0, B * L + 1, L, device=dev)
    g = torch.randn(B, D, device=dev)
    table_last = TTEmbeddingBag(
        args.num_embeddings, D, p, q, r, sparse=True, optimizer=OptimType.SGD, learning_rate=0.0, device=dev,
        include_last_offset=True,
    )
    cores = [c.detach() for c in table.tt_cores]
    ranks = [1, *r, 1]
    ops = torch.ops.torchrec_tt
    dense = torch.nn.EmbeddingBag(args.num_embeddings, D, mode="sum", sparse=True, device=dev)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.0)
    tiny = torch.zeros(1, device=dev)

    def dense_step() -> None:
        dense(ids, offsets[:-1]).backward(g)
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)

    def dense_forward_backward() -> None:
        dense(ids, offsets[:-1]).backward(g)
        dense.weight.grad = None

    def no_grad_forward() -> None:
        with torch.no_grad():
            table(ids, offsets[:-1])

    def ops_step() -> None:  # the module step's two ops, without autograd
        tt_embedding_bag_for_backward(cores, ids, offsets, None, p, q, ranks, args.num_embeddings, 0)
        ops.tt_embedding_bag_backward_fused_(g, cores, [], ids, offsets, None, p, q, ranks, args.num_embeddings, 0, 0, 0.0, 0.0)

    leaf = torch.zeros(1, device=dev, requires_grad=True)

    def empty_function_step() -> None:  # autograd's own cost: a Function doing nothing, on a CUDA tensor
        _NoOp.apply(leaf, ids, offsets, g).backward(g)

    parts: dict[str, Callable[[], object]] = {
        "TT module step (forward + backward + fused SGD)": lambda: table(ids, offsets[:-1]).backward(g),
        "TT module step, B + 1 offsets (include_last_offset=True)": lambda: table_last(ids, offsets).backward(g),
        "B + 1 module step on offsets appended outside (new_full + cat)": lambda: table_last(
            ids, torch.cat([offsets[:-1], offsets.new_full((1,), ids.numel())])
        ).backward(g),
        "B + 1 module step on offsets appended by F.pad": lambda: table_last(
            ids, torch.nn.functional.pad(offsets[:-1], (0, 1), value=ids.numel())
        ).backward(g),
        "offsets appended (new_full + cat) alone": lambda: torch.cat([offsets[:-1], offsets.new_full((1,), ids.numel())]),
        "TT forward op (keeping its batch) + fused backward op, no autograd": ops_step,
        "autograd Function doing nothing: apply + backward": empty_function_step,
        "TT module forward under no_grad": no_grad_forward,
        "TT forward op": lambda: ops.tt_embedding_bag_forward(cores, ids, offsets, None, p, q, ranks, args.num_embeddings, 0),
        "TT fused backward op (sorts its own batch)": lambda: ops.tt_embedding_bag_backward_fused_(
            g, cores, [], ids, offsets, None, p, q, ranks, args.num_embeddings, 0, 0, 0.0, 0.0
        ),
        "nn.EmbeddingBag(sparse=True) + SGD step": dense_step,
        "nn.EmbeddingBag(sparse=True) forward + backward, no optimizer step": dense_forward_backward,
        "one tiny kernel launch (x.add_(1))": lambda: tiny.add_(1),
    }
    if args.cache_size:
        cached = TTEmbeddingBag(
            args.num_embeddings, D, p, q, r, sparse=True, optimizer=OptimType.SGD, learning_rate=0.0, use_cache=True,
            cache_size=args.cache_size, device=dev,
        )
        cached(ids, offsets[:-1]).backward(g)
        cached.cache_populate()  # the batch's most frequent ids
        c = cached.cache
        parts.update({
            "TT+cache module step (forward + backward + fused SGD)": lambda: cached(ids, offsets[:-1]).backward(g),
            "TT+cache forward op (counting accesses)": lambda: ops.tt_cached_embedding_bag_forward(
                cores, c.cache_ids, c.cache_weight, c.hash_keys, c.hash_counts, c.stats, ids, offsets, None, p, q, ranks,
                args.num_embeddings, 0, c.max_probes, True,
            ),
            "TT+cache fused backward op (sorts its own batch)": lambda: ops.tt_cached_embedding_bag_backward_fused_(
                g, cores, [], c.cache_ids, c.cache_weight, [], ids, offsets, None, p, q, ranks, args.num_embeddings, 0, 0,
                0.0, 0.0,
            ),
        })
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "B": B,
        "L": L,
        "parts": {name: host_us_per_call(fn, args.iters) for name, fn in parts.items()},
    }
    log.info("Host time per call, %s, B=%d, L=%d (us):", results["device"], B, L)
    log.info(
        "| part | host us/call | GPU us/call | host us to issue a call (from idle) | its GPU span us |\n|---|---|---|---|---|"
    )
    for name, v in results["parts"].items():
        log.info("| %s | %.1f | %.1f | %.1f | %.1f |", name, v["host_us"], v["gpu_us"], v["issue_us"], v["span_us"])
    if args.trace:
        trace_host_time(parts["TT module step (forward + backward + fused SGD)"], args.trace)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
