#!/usr/bin/env python3
"""Benchmark TTEmbeddingBag (forward + backward + fused optimizer step) against nn.EmbeddingBag.

Reproduces FBTT-Embedding's ``tt_embeddings_benchmark.py`` honestly:

* same configuration by default (E = 11,000,000 rows, D = 64, p = 200,220,250,
  q = 4,4,4, ranks = 32,32, pooling factor 20, int64 ids);
* one timed iteration = forward + backward with the fused optimizer update inside
  backward (``sparse=True``), per batch of ``B`` bags;
* the output line keeps FBTT's format,
  ``TTEmbeddingBag FWD-BWD time/nnz: ... usecs, GFLOPS: ..., BW: ...``, with FBTT's
  definitions (GFLOPS = 3 x the naive forward chain FLOPs per lookup, BW = 3 x the
  bytes of an uncompressed fp32 row per lookup) but divided by the time of ONE
  iteration (FBTT multiplied both by the iteration count);
* the uncompressed baseline runs in the same process on the same ids:
  ``nn.EmbeddingBag(sparse=True)`` + the same optimizer (``torch.optim.SGD`` /
  ``Adagrad`` on the sparse gradient), and FBGEMM's TBE
  (``SplitTableBatchedEmbeddingBagsCodegen``, exact SGD/Adagrad) when its CUDA
  build imports.

Ids are uniform, or Zipf(alpha) over the rows scrambled by an affine bijection
(hot rows are spread over the table, not packed at the small ids that share TT
prefixes). Several batches are generated and used in turn. CUDA times come from
CUDA events (median over iterations), CPU times from ``time.perf_counter``.

Examples::

    python benchmarks/bench_tt_embedding_bag.py --device cpu          # ~1 minute
    python benchmarks/bench_tt_embedding_bag.py --device cuda --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
log = logging.getLogger("root")

CUDA_CASES = "512x20,4096x20,16384x20,65536x1"
CPU_CASES = "256x20,1024x20"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the tables live and the kernels run",
    )
    ap.add_argument("--num-embeddings", "-E", type=int, default=11_000_000, help="rows of the table")
    ap.add_argument("--p-shapes", default="200,220,250", help="TT row factorisation (prod >= E)")
    ap.add_argument("--q-shapes", default="4,4,4", help="TT column factorisation (prod = D)")
    ap.add_argument("--ranks", default="32,32", help="inner TT ranks (d - 1 values)")
    ap.add_argument(
        "--cases",
        default=None,
        help=f"comma list of BxL (bags x pooling factor); default {CUDA_CASES!r} on cuda, {CPU_CASES!r} on cpu",
    )
    ap.add_argument("--batch-size", "-B", type=int, default=None, help="run only this B (with --pooling-factor)")
    ap.add_argument("--pooling-factor", "-L", type=int, default=20, help="ids per bag when --batch-size is given")
    ap.add_argument("--dists", default="uniform,zipf", help="id distributions: uniform and/or zipf")
    ap.add_argument("--zipf-alpha", type=float, default=1.05, help="Zipf exponent of the zipf distribution")
    ap.add_argument("--optimizers", default="sgd,adagrad", help="fused optimizers: sgd, adagrad, rowwise_adagrad")
    ap.add_argument("--learning-rate", type=float, default=0.01, help="optimizer step size (all methods)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per case (default 50 cuda / 3 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 5 cuda / 1 cpu)")
    ap.add_argument("--num-batches", type=int, default=4, help="distinct id batches used in turn")
    ap.add_argument("--index-dtype", choices=["int64", "int32"], default="int64", help="dtype of ids and offsets")
    ap.add_argument(
        "--methods",
        default="tt,dense,fbgemm",
        help="what to time: tt (TTEmbeddingBag), dense (nn.EmbeddingBag sparse), fbgemm (TBE, CUDA build only)",
    )
    ap.add_argument(
        "--dense-max-rows",
        type=int,
        default=None,
        help="skip the dense baseline above this many rows (default: none on cuda, 11M on cpu)",
    )
    ap.add_argument("--fwd-only", action="store_true", help="also time the TT forward alone (where the time goes)")
    ap.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the TT step captured in a CUDA graph and replayed (GPU time without Python/launch overhead; cuda only)",
    )
    ap.add_argument(
        "--profile",
        nargs="?",
        const="last",
        default=None,
        help="print torch.profiler tables (GPU kernels, then host time by op and CUDA API call) of the TT step "
        "for these BxL cases (comma list; bare --profile: the last case); cuda, first optimizer, first dist",
    )
    ap.add_argument(
        "--float32-matmul-precision",
        choices=["highest", "high"],
        default="highest",
        help="torch.set_float32_matmul_precision for the run: high lets the TT backward kernel's tensor-core "
        "products take one TF32 pass (~2^-10 relative error per product) instead of fp32-accurate 3xTF32 (cuda)",
    )
    ap.add_argument("--out-dir", default=None, help="write results JSON + markdown (+ PNG plot) here")
    ap.add_argument("--tag", default=None, help="file name stem in --out-dir (default: date_gpu-name)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if args.iters is None:
        args.iters = 50 if cuda else 3
    if args.warmup is None:
        args.warmup = 5 if cuda else 1
    if args.batch_size is not None:
        args.cases = f"{args.batch_size}x{args.pooling_factor}"
    elif args.cases is None:
        args.cases = CUDA_CASES if cuda else CPU_CASES
    if args.dense_max_rows is None:
        args.dense_max_rows = 1 << 62 if cuda else 11_000_000
    return args


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def naive_fwd_flops_per_lookup(q: list[int], ranks: list[int]) -> int:
    """FLOPs of the left-to-right chain for one row (FBTT's formula for 3 cores)."""
    flops, qlt = 0, q[0]
    for k in range(1, len(q)):
        flops += 2 * qlt * ranks[k] * q[k] * ranks[k + 1]
        qlt *= q[k]
    return flops


# --------------------------------------------------------------------------- data
class IdSource:
    """Batches of ids (uniform or scrambled Zipf) and offsets."""

    def __init__(self, num_embeddings: int, dist: str, alpha: float, device: str, seed: int) -> None:
        self.n, self.dist, self.device = num_embeddings, dist, device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        if dist == "zipf":
            ranks = torch.arange(1, num_embeddings + 1, dtype=torch.float64)
            cdf = torch.cumsum(ranks.pow(-alpha), 0)
            self.cdf = (cdf / cdf[-1]).to(device)
            # affine bijection of [0, n): spreads hot rows over the table
            a = 2654435761 % num_embeddings
            while math.gcd(a, num_embeddings) != 1:
                a += 1
            self.a, self.b = a, 1_000_003 % num_embeddings
        elif dist != "uniform":
            raise ValueError(f"unknown distribution {dist!r}")

    def batch(self, num_bags: int, bag: int, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        nnz = num_bags * bag
        if self.dist == "uniform":
            ids = torch.randint(0, self.n, (nnz,), generator=self.gen).to(self.device)
        else:
            u = torch.rand(nnz, generator=self.gen, dtype=torch.float64).to(self.device)
            ranks = torch.searchsorted(self.cdf, u).clamp_(max=self.n - 1)
            ids = (ranks * self.a + self.b) % self.n
        offsets = torch.arange(0, nnz + 1, bag, device=self.device)
        return ids.to(index_dtype), offsets.to(index_dtype)


# --------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batches, iters: int, warmup: int, device: str) -> list[float]:
    """Per-iteration seconds of ``step(batch)`` over batches used in turn."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    times = []
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i in range(iters):
            events[i][0].record()
            step(batches[i % len(batches)])
            events[i][1].record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            step(batches[i % len(batches)])
            times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------- methods
def make_tt(args, optimizer: str, device: str):
    from torchrec_tt import OptimType, TTEmbeddingBag

    opt = {
        "sgd": OptimType.EXACT_SGD,
        "adagrad": OptimType.EXACT_ADAGRAD,
        "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD,
    }[optimizer]
    return TTEmbeddingBag(
        args.num_embeddings,
        math.prod(ints(args.q_shapes)),
        ints(args.p_shapes),
        ints(args.q_shapes),
        ints(args.ranks),
        sparse=True,
        optimizer=opt,
        learning_rate=args.learning_rate,
        mode="sum",
        include_last_offset=True,
        device=device,
    )


def make_dense(args, optimizer: str, device: str):
    emb = torch.nn.EmbeddingBag(
        args.num_embeddings,
        math.prod(ints(args.q_shapes)),
        mode="sum",
        sparse=True,
        include_last_offset=True,
        device=device,
        _weight=torch.empty(args.num_embeddings, math.prod(ints(args.q_shapes)), device=device).uniform_(-0.01, 0.01),
    )
    if optimizer == "sgd":
        opt = torch.optim.SGD(emb.parameters(), lr=args.learning_rate)
    elif optimizer == "adagrad":
        opt = torch.optim.Adagrad(emb.parameters(), lr=args.learning_rate)
    else:
        return None, None
    return emb, opt


def dense_step_of(emb: torch.nn.EmbeddingBag, opt: torch.optim.Optimizer):
    """The dense baseline's training step: forward, backward of ``b[2]``, optimizer step."""

    def step(b):
        emb(b[0], b[1]).backward(b[2])
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


_TBE_PROBE = """
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
tbe = SplitTableBatchedEmbeddingBagsCodegen([(10, 4, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)])
tbe(torch.zeros(2, dtype=torch.long, device="cuda"), torch.tensor([0, 1, 2], device="cuda")).sum().backward()
torch.cuda.synchronize()
print("TBE_OK")
"""


def make_fbgemm(args, optimizer: str, device: str):
    """FBGEMM TBE on CUDA, or (None, reason) when its CUDA build is missing.

    Probed in a subprocess first: the CPU-only build imports but has no CUDA kernels,
    and some of its ops crash the process when handed CUDA tensors.
    """
    if device != "cuda":
        return None, "TBE needs CUDA"
    import subprocess

    try:
        res = subprocess.run([sys.executable, "-c", _TBE_PROBE], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "probe timed out"
    if "TBE_OK" not in res.stdout:
        lines = [ln for ln in (res.stderr or "").splitlines() if ln.strip()]
        return None, f"fbgemm_gpu CUDA build not usable here ({lines[-1][:120] if lines else f'exit {res.returncode}'})"
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    opt = {
        "sgd": EmbOptimType.EXACT_SGD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    }[optimizer]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(args.num_embeddings, math.prod(ints(args.q_shapes)), EmbeddingLocation.DEVICE, ComputeDevice.CUDA)],
        optimizer=opt,
        learning_rate=args.learning_rate,
    )
    return tbe, None


# --------------------------------------------------------------------------- main
def run(args) -> dict:
    device = args.device
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    p, q, r = ints(args.p_shapes), ints(args.q_shapes), [1, *ints(args.ranks), 1]
    D = math.prod(q)
    index_dtype = torch.int64 if args.index_dtype == "int64" else torch.int32
    methods = set(args.methods.split(","))
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    fwd_flops = naive_fwd_flops_per_lookup(q, r)
    import torchrec_tt

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torchrec_tt_cuda_kernels": torchrec_tt.HAS_CUDA_KERNELS,
        "torchrec_tt_cpp_kernels": torchrec_tt.HAS_CPP_KERNELS,
        "num_embeddings": args.num_embeddings,
        "D": D,
        "p": p,
        "q": q,
        "ranks": r,
        "tt_params": sum(p[k] * r[k] * q[k] * r[k + 1] for k in range(len(p))),
        "iters": args.iters,
        "warmup": args.warmup,
        "index_dtype": args.index_dtype,
        "zipf_alpha": args.zipf_alpha,
        "learning_rate": args.learning_rate,
        "naive_fwd_flops_per_lookup": fwd_flops,
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": args.float32_matmul_precision,
    }
    info["compression"] = args.num_embeddings * D / info["tt_params"]
    log.info("sparse: True, optimizers: %s, device: %s (%s)", args.optimizers, device, info["device"])
    log.info("p_shapes: %s, q_shapes: %s, ranks: %s", p, q, r[1:-1])
    log.info(
        "E: %d, D: %d, TT params: %d (%.0fx smaller)", args.num_embeddings, D, info["tt_params"], info["compression"]
    )
    rows = []
    fbgemm_reason = "unprobed"
    for optimizer in args.optimizers.split(","):
        tt_mod = make_tt(args, optimizer, device) if "tt" in methods else None
        dense, dense_opt = (None, None)
        if "dense" in methods and args.num_embeddings <= args.dense_max_rows:
            dense, dense_opt = make_dense(args, optimizer, device)
        tbe = None
        if "fbgemm" in methods and (fbgemm_reason is None or fbgemm_reason == "unprobed"):
            tbe, fbgemm_reason = make_fbgemm(args, optimizer, device)
        for dist in args.dists.split(","):
            src = IdSource(args.num_embeddings, dist, args.zipf_alpha, device, args.seed)
            for num_bags, bag in cases:
                nnz = num_bags * bag
                batches = [
                    (*src.batch(num_bags, bag, index_dtype), torch.randn(num_bags, D, device=device))
                    for _ in range(args.num_batches)
                ]
                row = {"optimizer": optimizer, "dist": dist, "B": num_bags, "L": bag, "nnz": nnz}
                if tt_mod is not None:

                    def tt_step(b, m=tt_mod):
                        m(b[0], b[1]).backward(b[2])

                    t = statistics.median(time_steps(tt_step, batches, args.iters, args.warmup, device))
                    row["tt_s"] = t
                    row["tt_us_per_nnz"] = t / nnz * 1e6
                    row["tt_gflops"] = 3 * fwd_flops * nnz / t / 1e9
                    row["tt_gbps"] = 3 * 4 * nnz * D / t / 1e9
                    log.info(
                        "B: %d, L: %d, E: %d, D: %d, nnz: %d, dist: %s, optimizer: %s",
                        num_bags,
                        bag,
                        args.num_embeddings,
                        D,
                        nnz,
                        dist,
                        optimizer,
                    )
                    log.info(
                        "TTEmbeddingBag FWD-BWD time/nnz: %.3f usecs, GFLOPS: %.3f, BW: %.3f",
                        row["tt_us_per_nnz"],
                        row["tt_gflops"],
                        row["tt_gbps"],
                    )
                    if args.cuda_graph and device == "cuda":
                        tg = statistics.median(graph_times(tt_step, batches, args.iters, args.warmup))
                        row["tt_graph_us_per_nnz"] = tg / nnz * 1e6
                        log.info(
                            "TTEmbeddingBag FWD-BWD (CUDA graph replay) time/nnz: %.4f usecs",
                            row["tt_graph_us_per_nnz"],
                        )
                    if args.fwd_only:
                        with torch.no_grad():
                            tf = statistics.median(
                                time_steps(lambda b, m=tt_mod: m(b[0], b[1]), batches, args.iters, args.warmup, device)
                            )
                        row["tt_fwd_us_per_nnz"] = tf / nnz * 1e6
                        log.info("TTEmbeddingBag FWD time/nnz: %.4f usecs", row["tt_fwd_us_per_nnz"])
                if dense is not None:
                    dense_step = dense_step_of(dense, dense_opt)
                    t = statistics.median(time_steps(dense_step, batches, args.iters, args.warmup, device))
                    row["dense_us_per_nnz"] = t / nnz * 1e6
                    row["dense_gbps"] = 3 * 4 * nnz * D / t / 1e9
                    log.info(
                        "nn.EmbeddingBag(sparse=True)+%s FWD-BWD-step time/nnz: %.4f usecs, BW: %.3f",
                        optimizer,
                        row["dense_us_per_nnz"],
                        row["dense_gbps"],
                    )
                if tbe is not None:

                    def tbe_step(b, m=tbe):
                        m(b[0].long(), b[1].long()).backward(b[2])

                    t = statistics.median(time_steps(tbe_step, batches, args.iters, args.warmup, device))
                    row["fbgemm_us_per_nnz"] = t / nnz * 1e6
                    log.info("FBGEMM TBE FWD-BWD time/nnz: %.4f usecs", row["fbgemm_us_per_nnz"])
                if "tt_us_per_nnz" in row and "dense_us_per_nnz" in row:
                    row["tt_over_dense"] = row["tt_us_per_nnz"] / row["dense_us_per_nnz"]
                rows.append(row)
                del batches
                if args.out_dir:  # partial results survive a crash later in the run
                    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
                    (Path(args.out_dir) / "partial.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
        if args.profile and tt_mod is not None and device == "cuda" and optimizer == args.optimizers.split(",")[0]:
            src = IdSource(args.num_embeddings, args.dists.split(",")[0], args.zipf_alpha, device, args.seed)
            wanted = [cases[-1]] if args.profile == "last" else [tuple(int(v) for v in c.split("x")) for c in args.profile.split(",")]
            dense_step = dense_step_of(dense, dense_opt) if dense is not None else None
            for case in wanted:
                info.setdefault("profiles", []).append(profile_tt(tt_mod, dense_step, src, case, index_dtype, D, device))
        del tt_mod, dense, dense_opt, tbe
        if device == "cuda":
            torch.cuda.empty_cache()
    info["fbgemm_tbe"] = "ran" if fbgemm_reason is None else f"not run: {fbgemm_reason}"
    if "fbgemm" not in methods:
        info["fbgemm_tbe"] = "not run: not requested"
    return {"info": info, "rows": rows}


def capture_step(step, batch) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """``step`` on copies of ``batch`` (three warm-up calls on a side stream), then captured once in a CUDA graph.

    Returns the graph and the copies it reads: copy a new batch into them before a replay.
    """
    static = [t.clone() for t in batch]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static)
    return graph, static


def graph_times(step, batches, iters: int, warmup: int) -> list[float]:
    """Per-iteration seconds of ``step(batch)`` captured once in a CUDA graph; each batch is copied in before its replay."""
    graph, static = capture_step(step, batches[0])

    def replay(b):
        for dst, src in zip(static, b, strict=True):
            dst.copy_(src)
        graph.replay()

    return time_steps(replay, batches, iters, warmup, "cuda")


def kernel_us_per_step(prof, steps: int) -> float:
    """Device time of the profiled kernels and memory operations per step (rows with no host time)."""
    rows = prof.key_averages()
    return sum(e.self_device_time_total for e in rows if e.self_cpu_time_total == 0) / steps


def profiled_steps(step, batch, steps: int = 5, warmup: int = 3):
    """A torch.profiler run (host and CUDA activity) of ``steps`` calls of ``step(batch)``, after ``warmup``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(batch)
        torch.cuda.synchronize()
    return prof


def profile_tt(tt_mod, dense_step, src, case, index_dtype, D, device) -> dict:
    """Prints torch.profiler tables of 5 TT steps of ``case``; returns kernel us per step of TT and dense."""
    num_bags, bag = case
    ids, offsets = src.batch(num_bags, bag, index_dtype)
    batch = (ids, offsets, torch.randn(num_bags, D, device=device))
    prof = profiled_steps(lambda b: tt_mod(b[0], b[1]).backward(b[2]), batch)
    avg = prof.key_averages()
    print(f"\nKernel time of 5 TT steps at B={num_bags}, L={bag}:")
    print(avg.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=90))
    print(f"\nHost time of the same 5 steps (ops, autograd, CUDA API calls) at B={num_bags}, L={bag}:")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    out = {"B": num_bags, "L": bag, "tt_kernel_us_per_step": kernel_us_per_step(prof, 5)}
    if dense_step is not None:  # the dense step's kernels alike (its sum of kernel times, not its wall time)
        out["dense_kernel_us_per_step"] = kernel_us_per_step(profiled_steps(dense_step, batch), 5)
    print(
        f"\nKernel time per step at B={num_bags}, L={bag} (sum over kernels, us): TT "
        f"{out['tt_kernel_us_per_step']:.1f}, dense {out.get('dense_kernel_us_per_step', float('nan')):.1f}"
    )
    return out


FBTT_H200 = {(512, 20): 0.151, (4096, 20): 0.104, (16384, 20): 0.102, (65536, 1): 0.098}


def markdown(res: dict) -> str:
    info, rows = res["info"], res["rows"]
    lines = [
        f"# TTEmbeddingBag benchmark: {info['device']}, {info['date']}",
        "",
        f"E={info['num_embeddings']:,}, D={info['D']}, p={info['p']}, q={info['q']}, ranks={info['ranks']} "
        f"({info['tt_params']:,} TT parameters, {info['compression']:.0f}x smaller than the dense table); "
        f"torch {info['torch']}, CUDA {info['cuda']}; {info['iters']} timed iterations (median), ids {info['index_dtype']}, "
        f"Zipf alpha {info['zipf_alpha']}, float32 matmul precision "
        f"{info['float32_matmul_precision']}. One iteration = forward + backward + optimizer step. "
        f"FBGEMM TBE: {info['fbgemm_tbe']}.",
        "",
        "| optimizer | ids | B | L | TT us/nnz | TT graph us/nnz | dense us/nnz | TT / dense | FBTT (H200) us/nnz "
        "| TT GFLOP/s (nominal) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(r: dict, key: str, spec: str) -> str:
        return format(r[key], spec) if key in r else "-"

    for r in rows:
        fbtt = FBTT_H200.get((r["B"], r["L"])) if r["optimizer"] == "sgd" and r["dist"] == "uniform" else None
        lines.append(
            f"| {r['optimizer']} | {r['dist']} | {r['B']} | {r['L']} | {fmt(r, 'tt_us_per_nnz', '.4f')} | "
            f"{fmt(r, 'tt_graph_us_per_nnz', '.4f')} | {fmt(r, 'dense_us_per_nnz', '.4f')} | "
            f"{fmt(r, 'tt_over_dense', '.2f')} | {fbtt if fbtt else '-'} | {fmt(r, 'tt_gflops', '.0f')} |"
        )
    lines += [
        "",
        "TT: eager `TTEmbeddingBag(sparse=True)` forward + `backward()` (fused update), run like the dense baseline. "
        "TT graph: the same step captured once in a CUDA graph and replayed (new ids copied in first): GPU time "
        "without Python / launch overhead. FBTT column: FBTT-Embedding rebuilt for sm_90, measured on an H200 "
        "(design notes, fwd+bwd+SGD, uniform ids).",
        "",
    ]
    for prof in info.get("profiles", []):
        dense = prof.get("dense_kernel_us_per_step")
        lines += [
            f"Kernel time per step at B = {prof['B']}, L = {prof['L']} (torch.profiler, the sum of the kernels' "
            f"times, the run's first optimizer and id distribution): TT {prof['tt_kernel_us_per_step']:.1f} us, "
            f"dense {'-' if dense is None else f'{dense:.1f} us'}.",
            "",
        ]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no plot")
        return False
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = sorted({(r["B"], r["L"]) for r in rows})
    x = {c: i for i, c in enumerate(labels)}
    series = {}
    for r in rows:
        for key, name in (
            ("tt_us_per_nnz", "TT"),
            ("tt_graph_us_per_nnz", "TT graph"),
            ("dense_us_per_nnz", "dense"),
            ("fbgemm_us_per_nnz", "TBE"),
        ):
            if key in r:
                series.setdefault(f"{name} {r['optimizer']} {r['dist']}", []).append((x[(r["B"], r["L"])], r[key]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            [a for a, _ in pts],
            [b for _, b in pts],
            marker="o" if name.startswith("TT") else "x",
            linestyle="-" if name.startswith("TT") else "--",
            label=name,
        )
    fb = [(x[c], v) for c, v in FBTT_H200.items() if c in x]
    if fb:
        ax.plot([a for a, _ in fb], [b for _, b in fb], "k:", marker="s", label="FBTT sgd uniform (H200, notes)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), [f"B={b}\nL={bag}" for b, bag in labels])
    ax.set_ylabel("us per lookup (fwd + bwd + update)")
    ax.set_title(f"TTEmbeddingBag vs uncompressed, {res['info']['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA device", file=sys.stderr)
        return 2
    res = run(args)
    md = markdown(res)
    print("\n" + md)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = res["info"]["device"].replace(" ", "-").replace("/", "-")
        stem = args.tag or f"{_dt.date.today().isoformat()}_{name}_{args.device}"
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "partial.json").unlink(missing_ok=True)
        (out / f"{stem}.md").write_text(md)
        plot(res, out / f"{stem}.png")
        log.info("wrote %s/%s.{json,md,png}", out, stem)
    return 0


if __name__ == "__main__":
    if os.environ.get("TORCHREC_TT_BENCH_DEBUG"):
        logging.getLogger().setLevel(logging.DEBUG)
    sys.exit(main())
