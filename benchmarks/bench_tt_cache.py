#!/usr/bin/env python3
"""Benchmark the LFU cache of ``TTEmbeddingBag``: hit rate and time per lookup vs cache size.

Setting (issue: LFU software cache): seed shapes (E = 11,000,000, D = 64,
p = 200,220,250, q = 4,4,4, ranks = 32,32), B = 16384 bags of L = 20 ids, scrambled
Zipf ids (alpha 1.05 and 1.2; hot rows spread over the table by an affine
bijection, as in ``bench_tt_embedding_bag.py``), fused SGD.

For every alpha and cache size (a fraction of the rows):

1. warm-up: ``--count-batches`` training steps count access frequencies, then
   ``cache_populate()`` (timed, once);
2. timed: ``--iters`` training steps (forward + backward + fused update of cached
   rows and cores) on fresh batches of the same distribution; the hit rate is the
   cache's own counter over those steps.

In the same run: the TT table without a cache and the uncompressed
``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SGD`` on the same batches. Then one
repopulate on a shifted distribution measures eviction with write-back: time, rows
evicted, and the residual ``||TT row - trained cached row||`` before and after the
fit (``discard`` would leave it unchanged).

Examples::

    python benchmarks/bench_tt_cache.py --device cpu --num-embeddings 200000 --p-shapes 50,40,100 --batch 1024
    python benchmarks/bench_tt_cache.py --device cuda --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tt_embedding_bag import IdSource, graph_times, ints, sync, time_steps  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
log = logging.getLogger("bench_tt_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-embeddings", type=int, default=11_000_000)
    ap.add_argument("--p-shapes", default="200,220,250")
    ap.add_argument("--q-shapes", default="4,4,4")
    ap.add_argument("--ranks", default="32,32")
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--bag", type=int, default=20)
    ap.add_argument("--alphas", default="1.05,1.2")
    ap.add_argument("--cache-fractions", default="0.00001,0.0001,0.001,0.01", help="cache rows / num_embeddings")
    ap.add_argument("--learning-rate", type=float, default=0.01)
    ap.add_argument("--count-batches", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--num-batches", type=int, default=4, help="distinct timed batches used in turn")
    ap.add_argument("--out-dir", default=None, help="write JSON + markdown here")
    ap.add_argument("--profile", action="store_true", help="profile the first alpha at the largest cache and exit")
    ap.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the TT steps captured in a CUDA graph and replayed (cuda only)",
    )
    return ap.parse_args(argv)


def _tt(args: argparse.Namespace, cache_rows: int) -> torch.nn.Module:
    from torchrec_tt import OptimType, TTEmbeddingBag

    return TTEmbeddingBag(
        args.num_embeddings, math.prod(ints(args.q_shapes)), ints(args.p_shapes), ints(args.q_shapes), ints(args.ranks),
        sparse=True, optimizer=OptimType.EXACT_SGD, learning_rate=args.learning_rate, use_cache=cache_rows > 0,
        cache_size=cache_rows, hashtbl_size=max(4 * cache_rows, 1 << 22) if cache_rows else 0,
        mode="sum", include_last_offset=True, device=args.device,
    )


def _us_per_nnz(times: list[float], nnz: int) -> float:
    return statistics.median(times) / nnz * 1e6


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dim = math.prod(ints(args.q_shapes))
    nnz = args.batch * args.bag
    rows: list[dict] = []

    # A fixed upstream gradient of realistic size keeps the trained values finite (a plain
    # .sum() loss over 16k bags diverges within a few SGD steps, which would poison the
    # write-back measurement); the work per step is the same.
    grad = 1e-3 * torch.randn(args.batch, dim, device=device, generator=torch.Generator(device).manual_seed(0))

    def step_of(module):
        def step(b):
            module(b[0], b[1]).backward(grad)
        return step

    for alpha in [float(a) for a in args.alphas.split(",")]:
        src = IdSource(args.num_embeddings, "zipf", alpha, device, seed=int(alpha * 1000))
        count_batches = [src.batch(args.batch, args.bag, torch.int64) for _ in range(args.count_batches)]
        timed = [src.batch(args.batch, args.bag, torch.int64) for _ in range(args.num_batches)]
        dense = torch.nn.EmbeddingBag(args.num_embeddings, dim, mode="sum", sparse=True, include_last_offset=True, device=device)
        dense_opt = torch.optim.SGD(dense.parameters(), lr=args.learning_rate)

        def dense_step(b, m=dense, o=dense_opt):
            o.zero_grad(set_to_none=True)
            m(b[0], b[1]).backward(grad)
            o.step()

        dense_us = _us_per_nnz(time_steps(dense_step, timed, args.iters, args.warmup, device), nnz)
        del dense, dense_opt
        graphed = args.cuda_graph and device == "cuda"
        tt = _tt(args, 0)
        tt_us = _us_per_nnz(time_steps(step_of(tt), timed, args.iters, args.warmup, device), nnz)
        tt_graph_us = _us_per_nnz(graph_times(step_of(tt), timed, args.iters, args.warmup), nnz) if graphed else None
        del tt
        log.info(
            "alpha %.2f: uncompressed %.5f us/nnz, TT without cache %.5f us/nnz (CUDA graph %s)", alpha, dense_us, tt_us,
            tt_graph_us,
        )
        for frac in [float(f) for f in args.cache_fractions.split(",")]:
            cache_rows = max(1, round(frac * args.num_embeddings))
            tt = _tt(args, cache_rows)
            for b in count_batches:
                step_of(tt)(b)
            sync(device)
            t0 = _now(device)
            tt.cache_populate()
            populate_s = _now(device) - t0
            for i in range(args.warmup):
                step_of(tt)(timed[i % len(timed)])
            if args.profile and frac == max(float(f) for f in args.cache_fractions.split(",")):
                _profile(step_of(tt), timed, device)
                return {}
            tt.cache.reset_statistics()
            times = time_steps(step_of(tt), timed, args.iters, 0, device)
            stats = tt.cache_stats()
            graph_us = _us_per_nnz(graph_times(step_of(tt), timed, args.iters, args.warmup), nnz) if graphed else None
            row = {
                "alpha": alpha, "cache_fraction": frac, "cache_rows": cache_rows, "hit_rate": stats["hit_rate"],
                "unique_misses_per_step": stats["unique_misses"] / args.iters, "hash_dropped": stats["hash_dropped"],
                "tt_cache_us_per_nnz": _us_per_nnz(times, nnz), "tt_us_per_nnz": tt_us, "dense_us_per_nnz": dense_us,
                "populate_s": populate_s, "tt_cache_graph_us_per_nnz": graph_us, "tt_graph_us_per_nnz": tt_graph_us,
            }
            row["vs_dense"] = row["tt_cache_us_per_nnz"] / dense_us
            row["graph_vs_dense"] = graph_us / dense_us if graphed else None
            if frac == max(float(f) for f in args.cache_fractions.split(",")):
                row.update(_writeback_check(args, tt, src, alpha))
            rows.append(row)
            log.info("%s", json.dumps(row))
            del tt
            if device == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {
        "date": _dt.date.today().isoformat(), "device": device, "device_name": gpu, "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"}, "rows": rows,
    }


def _profile(step, batches, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for i in range(5):
            step(batches[i % len(batches)])
        sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=40))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def _now(device: str) -> float:
    import time

    sync(device)
    return time.perf_counter()


def _writeback_check(args: argparse.Namespace, tt, src: IdSource, alpha: float) -> dict:
    """Shift the hot set (other seed of the id scrambling), repopulate, report the write-back fit."""
    from torchrec_tt.modules.tt_cache import EMPTY_ID
    from torchrec_tt.ops import tt_lookup_rows

    old_ids = tt.cache.cache_ids.clone()
    old_rows = tt.cache.cache_weight.clone()
    shifted = IdSource(args.num_embeddings, "zipf", alpha, args.device, seed=7)
    shifted.b = (src.b + args.num_embeddings // 3) % args.num_embeddings
    tt.cache.hash_counts.zero_()
    for _ in range(2):
        tt.cache.record(shifted.batch(args.batch, args.bag, torch.int64)[0])
    t0 = _now(args.device)
    tt.cache_populate()
    seconds = _now(args.device) - t0
    new_ids = tt.cache.cache_ids
    evicted = (old_ids != EMPTY_ID) & ~torch.isin(old_ids, new_ids)
    ids = old_ids[evicted]
    if ids.numel() == 0:
        return {"writeback_evicted": 0}
    after = tt_lookup_rows(list(tt.tt_cores), ids, *tt._op_shape_args())
    last = getattr(tt, "last_writeback", None)
    return {
        "writeback_evicted": int(ids.numel()), "writeback_populate_s": seconds,
        "writeback_residual_before": last[1] if last else float("nan"),
        "writeback_residual_after": float((after - old_rows[evicted]).norm()),
    }


def markdown(res: dict) -> str:
    lines = [
        f"# TT + LFU cache vs uncompressed — {res['device_name']} ({res['device']}), {res['date']}, torch {res['torch']}",
        "",
        f"E={res['config']['num_embeddings']:,}, D={math.prod(ints(res['config']['q_shapes']))}, "
        f"p={res['config']['p_shapes']}, ranks={res['config']['ranks']}, B={res['config']['batch']}, "
        f"L={res['config']['bag']}, fused SGD, forward + backward + update; median of {res['config']['iters']} steps.",
        "",
        "| alpha | cache rows (% of E) | hit rate | TT+cache us/nnz | TT us/nnz | uncompressed us/nnz "
        "| TT+cache / uncompressed | TT+cache graph us/nnz | TT graph us/nnz | graph / uncompressed | populate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def opt(r: dict, key: str, spec: str, suffix: str = "") -> str:
        return "-" if r.get(key) is None else f"{r[key]:{spec}}{suffix}"

    for r in res["rows"]:
        lines.append(
            f"| {r['alpha']} | {r['cache_rows']:,} ({100 * r['cache_fraction']:.3g}%) | {r['hit_rate']:.3f} | "
            f"{r['tt_cache_us_per_nnz']:.5f} | {r['tt_us_per_nnz']:.5f} | {r['dense_us_per_nnz']:.5f} | "
            f"{r['vs_dense']:.2f}x | {opt(r, 'tt_cache_graph_us_per_nnz', '.5f')} | {opt(r, 'tt_graph_us_per_nnz', '.5f')} | "
            f"{opt(r, 'graph_vs_dense', '.2f', 'x')} | {r['populate_s']:.3f} |"
        )
    lines += [
        "",
        "Eager columns: wall time per step (Python, autograd and kernel launches included). Graph columns: the same "
        "TT step captured once in a CUDA graph and replayed, the next batch's ids copied in first (GPU time without "
        "host overhead). The uncompressed step (sparse gradients, coalesced by torch.optim.SGD) is eager only: its "
        "sparse-gradient path synchronises with the host and cannot be captured.",
    ]
    wb = [r for r in res["rows"] if r.get("writeback_evicted")]
    if wb:
        lines += ["", "Eviction with write-back (hot set shifted, one repopulate):", ""]
        for r in wb:
            lines.append(
                f"- alpha {r['alpha']}: {r['writeback_evicted']:,} rows evicted, populate incl. write-back "
                f"{r['writeback_populate_s']:.3f} s, residual ||TT row - trained row|| "
                f"{r['writeback_residual_before']:.4g} -> {r['writeback_residual_after']:.4g}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    if args.profile:
        return 0
    text = markdown(res)
    print(text)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{res['date']}_{res['device']}_tt_cache"
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (out / f"{stem}.md").write_text(text)
        log.info("wrote %s/%s.{json,md}", out, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
