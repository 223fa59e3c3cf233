#!/usr/bin/env python3
"""Pooled-embedding all-to-all with FP32 / FP16 / BF16 / error-bounded codecs: bytes, time, error.

Launch one process per GPU (NCCL) or N CPU processes (gloo)::

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_comm_codec.py --device cuda \
        --out-dir benchmarks/results
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_comm_codec.py --device cpu   # small shapes

What runs is torchrec's own ``PooledEmbeddingsAllToAll`` (the output dist of table-wise
sharding; the same ``All2All_Pooled_Req/Wait`` path DMP uses) on a realistic pooled-embedding
layout: ``--num-tables`` tables of ``--dim`` columns assigned round-robin to the ranks, batch
``--batch-per-rank`` per rank, values of table ``t`` drawn N(0, s_t^2) with per-table scales
log-uniform in [1e-3, 1] (gradients 1e-3 smaller). Per codec:

* ``bytes``: bytes sent to *other* ranks per step, summed over ranks, forward (values) and
  backward (gradients), computed with the codec's ``calc_quantized_size`` exactly as torchrec
  sizes the splits; ``vs_fp32`` = FP32 bytes / codec bytes;
* ``fwd_ms`` (encode + all-to-all + decode of the values), ``fwd_bwd_ms`` (plus the gradient
  all-to-all through autograd), and the breakdown ``encode_ms`` / ``a2a_ms`` (the collective
  alone on the encoded payload) / ``decode_ms``: medians over ``--iters`` after ``--warmup``,
  CUDA events on GPU (``perf_counter`` on CPU), the max over ranks of the per-rank medians,
  ranks aligned by a barrier before every timed iteration;
* ``max_abs_err`` / ``rel_rms_err`` of the received values against the FP32 all-to-all, and,
  for the error-bounded codecs, ``bound_ok``: every element within its guaranteed bound.

``--compile`` adds ``eb*_compiled`` rows (encode/decode through ``torch.compile``); a failure
to compile is recorded, not fatal. With ``--out-dir``: ``<date>_<device>_comm_codec.json``
and ``.md`` (rank 0).
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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("bench_comm_codec")

A2A = "POOLED_EMBEDDINGS_ALL_TO_ALL"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--batch-per-rank", type=int, default=None, help="default 16384 on cuda, 1024 on cpu")
    ap.add_argument("--num-tables", type=int, default=26)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--codecs", default="fp32,fp16,bf16,eb16,eb8,eb4", help="fp32, fp16, bf16, eb4, eb8, eb16")
    ap.add_argument("--block-size", type=int, default=None, help="default: largest power of 2 <= 32 dividing --dim")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 50 cuda, 5 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 10 cuda, 2 cpu)")
    ap.add_argument("--compile", action="store_true", help="also time the eb codecs with torch.compile'd kernels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- setup
def init() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun --nproc_per_node N (N >= 2 for a real all-to-all)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, torch.device("cpu")


def make_inputs(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Global batch of pooled embeddings for this rank's tables, and output-side gradients."""
    g = torch.Generator().manual_seed(args.seed)
    scales = torch.exp(torch.empty(args.num_tables).uniform_(math.log(1e-3), 0.0, generator=g))
    owner = [t % world for t in range(args.num_tables)]
    local = [t for t in range(args.num_tables) if owner[t] == rank]
    dim_sum_per_rank = [sum(args.dim for t in range(args.num_tables) if owner[t] == r) for r in range(world)]
    b = args.batch_per_rank
    gl = torch.Generator().manual_seed(args.seed + 1 + rank)
    cols = [torch.randn(b * world, args.dim, generator=gl) * scales[t] for t in local]
    embs = torch.cat(cols, dim=1) if cols else torch.zeros(b * world, 0)
    # gradient of the a2a output (B_local, sum of all dims, in rank order of the tables)
    order = [t for r in range(world) for t in range(args.num_tables) if owner[t] == r]
    grad = torch.cat([torch.randn(b, args.dim, generator=gl) * scales[t] * 1e-3 for t in order], dim=1)
    return {
        "embs": embs.to(device),
        "grad": grad.to(device),
        "dim_sum_per_rank": dim_sum_per_rank,
        "batch_size_per_rank": [b] * world,
        "scales": scales.tolist(),
    }


def codecs_for(name: str, args: argparse.Namespace, device: torch.device) -> Any:
    """``QuantizedCommCodecs`` of the pooled all-to-all for a benchmark codec name (None: FP32)."""
    from torchrec_tt.distributed.comm_codec import make_comm_codecs_registry

    compiled = name.endswith("_compiled")
    base = name.removesuffix("_compiled")
    if base == "fp32":
        return None
    opts: dict[str, Any] = {}
    if base.startswith("eb"):
        opts = {"block_size": args.block_size, "compile": compiled, "reduce_scatter": None}
    registry = make_comm_codecs_registry(base, device, embedding_dims=[args.dim], **opts)
    return registry[A2A]


# ----------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], iters: int, warmup: int) -> float:
        """Median ms of ``fn`` over ``iters`` calls (ranks aligned by a barrier before each)."""
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            dist.barrier()
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        med = torch.tensor([statistics.median(times)], dtype=torch.float64)
        if self.cuda:
            med = med.cuda()
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        return float(med)


def wire_bytes(codec: Any, rank: int, world: int, dim_sum_per_rank: list[int], batch: int, ctx: Any) -> tuple[int, int]:
    """Bytes this rank sends to other ranks: forward (values), backward (gradients)."""
    if codec is None:
        fwd = sum(dim_sum_per_rank[rank] * batch for r in range(world) if r != rank) * 4
        bwd = sum(dim_sum_per_rank[r] * batch for r in range(world) if r != rank) * 4
        return fwd, bwd
    f, b = codec.forward, codec.backward
    fsize = torch.tensor([], dtype=f.quantized_dtype).element_size()
    bsize = torch.tensor([], dtype=b.quantized_dtype).element_size()
    fctx = f.create_context() if ctx is None else ctx
    bctx = b.create_context() if ctx is None else ctx
    fwd = sum(f.calc_quantized_size(dim_sum_per_rank[rank] * batch, fctx) for r in range(world) if r != rank) * fsize
    bwd = sum(b.calc_quantized_size(dim_sum_per_rank[r] * batch, bctx) for r in range(world) if r != rank) * bsize
    return fwd, bwd


def run_codec(
    name: str,
    args: argparse.Namespace,
    inp: dict[str, Any],
    ref: torch.Tensor | None,
    rank: int,
    world: int,
    device: torch.device,
    timer: Timer,
) -> dict[str, Any]:
    from torchrec.distributed.dist_data import PooledEmbeddingsAllToAll

    from torchrec_tt.distributed.comm_codec import block_error_bound

    pg = dist.group.WORLD
    codecs = codecs_for(name, args, device)
    a2a = PooledEmbeddingsAllToAll(pg, inp["dim_sum_per_rank"], device=device, codecs=codecs)
    bs = inp["batch_size_per_rank"]
    embs, grad = inp["embs"], inp["grad"]

    def fwd() -> torch.Tensor:
        return a2a(embs, bs).wait()

    x = embs.detach().clone().requires_grad_(True)

    def fwd_bwd() -> None:
        x.grad = None
        a2a(x, bs).wait().backward(grad)

    out = fwd()
    res: dict[str, Any] = {"codec": name}
    fb, bb = wire_bytes(codecs, rank, world, inp["dim_sum_per_rank"], args.batch_per_rank, None)
    t = torch.tensor([fb, bb], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    res["bytes_fwd"], res["bytes_bwd"] = int(t[0]), int(t[1])
    res["fwd_ms"] = timer(fwd, args.iters, args.warmup)
    res["fwd_bwd_ms"] = timer(fwd_bwd, args.iters, args.warmup)
    # breakdown: encode, the collective alone on the encoded payload, decode
    flat = embs.reshape(-1)
    if codecs is not None:
        enc, ctx = codecs.forward, codecs.forward.create_context()
        payload = enc.encode(flat, ctx)
        in_splits = [enc.calc_quantized_size(inp["dim_sum_per_rank"][rank] * b, ctx) for b in bs]
        out_splits = [enc.calc_quantized_size(d * args.batch_per_rank, ctx) for d in inp["dim_sum_per_rank"]]
        received = torch.empty(sum(out_splits), dtype=payload.dtype, device=device)
        res["encode_ms"] = timer(lambda: enc.encode(flat, ctx), args.iters, args.warmup)
        res["decode_ms"] = timer(lambda: enc.decode(received, ctx), args.iters, args.warmup)
    else:
        payload = flat
        in_splits = [inp["dim_sum_per_rank"][rank] * b for b in bs]
        out_splits = [d * args.batch_per_rank for d in inp["dim_sum_per_rank"]]
        received = torch.empty(sum(out_splits), dtype=payload.dtype, device=device)
        res["encode_ms"] = res["decode_ms"] = 0.0
    res["a2a_ms"] = timer(
        lambda: dist.all_to_all_single(received, payload, out_splits, in_splits, group=pg), args.iters, args.warmup
    )
    # error of the received values against the FP32 all-to-all (exact)
    if ref is not None:
        err = (out.float() - ref).abs()
        stats = torch.tensor(
            [float(err.max()), float((err**2).sum()), float((ref**2).sum())], dtype=torch.float64, device=device
        )
        ok = torch.ones(1, device=device)
        if name.startswith("eb"):
            bits = int(name.removesuffix("_compiled")[2:])
            block = codecs.forward.block_size
            # the receiver's (B_local, D_rank) chunks are whole blocks of the sender's layout
            chunks = ref.split(inp["dim_sum_per_rank"], dim=1)
            bound = torch.cat([block_error_bound(c.contiguous(), bits, block) for c in chunks], dim=1)
            ok = (err.double() <= bound).all().float().reshape(1)
        dist.all_reduce(stats[:1], op=dist.ReduceOp.MAX)
        dist.all_reduce(stats[1:])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        res["max_abs_err"] = float(stats[0])
        res["rel_rms_err"] = math.sqrt(float(stats[1]) / max(float(stats[2]), 1e-300))
        if name.startswith("eb"):
            res["bound_ok"] = bool(ok.item())
    return res


# ----------------------------------------------------------------------------- report
def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    fp32 = next((r for r in results if r["codec"] == "fp32" and "error" not in r), None)
    lines = [
        f"# Pooled all-to-all codecs: {meta['device_name']} x {meta['world_size']} ({meta['backend']})",
        "",
        f"{meta['date']}; torch {meta['torch']}, torchrec {meta['torchrec']}; {meta['num_tables']} tables x dim "
        f"{meta['dim']}, batch {meta['batch_per_rank']} per rank, block {meta['block_size']}; medians of "
        f"{meta['iters']} iterations (max over ranks). Bytes: sent to other ranks per step, all ranks.",
        "",
        "| codec | fwd MB | bwd MB | vs FP32 | fwd ms | fwd+bwd ms | encode ms | a2a ms | decode ms | max abs err | rel RMS err | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['codec']} | failed: {r['error'].splitlines()[-1][:80]} |" + " |" * 10)
            continue
        ratio = (fp32["bytes_fwd"] + fp32["bytes_bwd"]) / (r["bytes_fwd"] + r["bytes_bwd"]) if fp32 else float("nan")
        bound = {True: "ok", False: "VIOLATED"}.get(r.get("bound_ok"), "")
        lines.append(
            f"| {r['codec']} | {r['bytes_fwd'] / 1e6:.1f} | {r['bytes_bwd'] / 1e6:.1f} | {ratio:.2f}x | {r['fwd_ms']:.3f} | "
            f"{r['fwd_bwd_ms']:.3f} | {r['encode_ms']:.3f} | {r['a2a_ms']:.3f} | {r['decode_ms']:.3f} | "
            f"{r.get('max_abs_err', float('nan')):.3g} | {r.get('rel_rms_err', float('nan')):.3g} | {bound} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world, device = init()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dist.init_process_group(backend=backend)
    if args.batch_per_rank is None:
        args.batch_per_rank = 16384 if use_cuda else 1024
    if args.iters is None:
        args.iters = 50 if use_cuda else 5
    if args.warmup is None:
        args.warmup = 10 if use_cuda else 2
    if args.block_size is None:
        args.block_size = 32
        while args.block_size > 2 and args.dim % args.block_size:
            args.block_size //= 2
    import torchrec

    names = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if args.compile:
        names += [f"{n}_compiled" for n in names if n.startswith("eb")]
    if "fp32" in names:  # the reference first
        names.remove("fp32")
        names.insert(0, "fp32")
    inp = make_inputs(args, rank, world, device)
    timer = Timer(device)
    results: list[dict[str, Any]] = []
    ref = None
    for name in names:
        try:
            res = run_codec(name, args, inp, ref, rank, world, device, timer)
            if name == "fp32":
                from torchrec.distributed.dist_data import PooledEmbeddingsAllToAll

                a2a = PooledEmbeddingsAllToAll(dist.group.WORLD, inp["dim_sum_per_rank"], device=device)
                ref = a2a(inp["embs"], inp["batch_size_per_rank"]).wait().float()
        except Exception:  # noqa: BLE001 - record and go on (e.g. torch.compile unavailable)
            res = {"codec": name, "error": traceback.format_exc()}
            log.error("rank %d: %s failed:\n%s", rank, name, res["error"])
            dist.barrier()
        results.append(res)
        if rank == 0:
            print(json.dumps(res), flush=True)
    meta = {
        "date": _dt.date.today().isoformat(),
        "world_size": world,
        "backend": backend,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torchrec": getattr(torchrec, "__version__", "?"),
        "python": sys.version.split()[0],
        "num_tables": args.num_tables,
        "dim": args.dim,
        "batch_per_rank": args.batch_per_rank,
        "block_size": args.block_size,
        "iters": args.iters,
        "warmup": args.warmup,
    }
    if rank == 0:
        md = markdown(results, meta)
        print(md, flush=True)
        if args.out_dir:
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            dev = meta["device_name"].replace(" ", "-") if use_cuda else "cpu"
            stem = f"{meta['date']}_{world}x{dev}_comm_codec{('_' + args.tag) if args.tag else ''}"
            (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            (out / f"{stem}.md").write_text(md)
            print(f"wrote {out / stem}.json/.md", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
