"""Warp-stall samples of a kernel per CUDA source line, from Nsight Compute's SASS source page.

`scripts/gpu_ncu.sh` with ``SOURCE=1`` brings back ``<report>.source_sass.csv``: one row per SASS
instruction with its stall samples, but no source line (this ncu's CSV export of the CUDA view has
no metrics). This script compiles the same kernels here (``nvcc -cubin -lineinfo``, as
``scripts/cuda_code_size.sh`` does, or a cubin you pass), reads the line table with ``nvdisasm -gi``,
checks that the kernel's instruction sequence is the one that ran (same opcodes in the same order),
and sums the samples per source line. An inlined line is charged to its call site in ``--file``
(default: the fast item kernels' header), so helper functions show where the kernel calls them.

Run it from a checkout of the profiled revision (the line numbers and the source text are its own).
Usage (repository root, with the project's Python; no GPU needed)::

    python scripts/ncu_source_lines.py results/ncu_B4096_L20.source_sass.csv \
        --kernel 'tt_fast_item_kernel<4, 32, 32, 4, 1, 1, 0>' --top 40

Needs nvcc and nvdisasm (``NVDISASM`` or PATH; ``scripts/cuda_code_size.sh`` says where a wheel has
it). Prints, per line: share of all samples, samples, executed warp instructions, the two largest
stall reasons, and the source text.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile

_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _short(kernel: str) -> str:
    """ncu's kernel name as `tt_fast_item_kernel<4, 32, 32, 4, 1, 1, 0>` (no namespaces or casts)."""
    name = re.sub(r"\((?:int|bool)\)", "", kernel.split("(torchrec_tt")[0])
    return re.sub(r"^void\s+|torchrec_tt::cuda_detail::", "", name).strip()


def read_samples(path: str) -> dict[str, list[dict[str, str]]]:
    """Rows of each kernel of an ncu SASS source CSV (the first profiled launch of each)."""
    kernels: dict[str, list[dict[str, str]]] = {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    i = 0
    while i < len(rows):
        if rows[i] and rows[i][0] == "Kernel Name":
            name, header = _short(rows[i][1]), rows[i + 1]
            j = i + 2
            body = []
            while j < len(rows) and not (rows[j] and rows[j][0] == "Kernel Name"):
                body.append(dict(zip(header, rows[j], strict=False)))  # the name row ends in a comma
                j += 1
            kernels.setdefault(name, body)
            i = j
        else:
            i += 1
    return kernels


def compile_cubin(out_dir: str) -> str:
    """The CUDA kernels built for sm_90 with line info, by scripts/cuda_code_size.sh (its flags)."""
    cubin = os.path.join(out_dir, "tt.cubin")
    env = {**os.environ, "CUBIN": cubin, "TOP": "0", "LINES": ""}
    subprocess.run(["bash", "scripts/cuda_code_size.sh"], env=env, check=True, stdout=subprocess.DEVNULL)
    return cubin


def line_table(cubin: str, kernel: str, home: str) -> list[tuple[str, str]]:
    """(``file:line`` charged, opcode) of every instruction of the kernel, in address order."""
    nvdisasm = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not nvdisasm:
        sys.exit("ncu_source_lines.py: nvdisasm not found (set NVDISASM)")
    sass = subprocess.run(
        [nvdisasm, "-gi", "-c", cubin], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    header = "//--------------------- .text."
    mangled = [raw.split(".text.", 1)[1].split()[0] for raw in sass if raw.startswith(header)]
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True).stdout
    names = iter(demangled.splitlines())
    table: list[tuple[str, str]] = []
    inside, where = False, "?"
    for raw in sass:
        if raw.startswith(header):
            inside = _short(next(names).replace("true", "1").replace("false", "0")) == kernel
            continue
        if not inside:
            continue
        m = _LINE.search(raw)
        if m:
            file, line, at_file, at_line = m.groups()
            if at_file and home and not file.endswith(home) and at_file.endswith(home):
                file, line = at_file, at_line  # a helper from another header: charge the call site
            where = f"{os.path.basename(file)}:{line}"
            continue
        m = _INSN.search(raw)
        if m:
            table.append((where, _opcode(m.group(2))))
    return table


def _opcode(sass: str) -> str:
    """`FFMA` of `@!P0 FFMA R1, R2, R3, R4`."""
    words = sass.split()
    return words[1] if words[0].startswith("@") else words[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="<report>.source_sass.csv from scripts/gpu_ncu.sh SOURCE=1")
    ap.add_argument(
        "--kernel", required=True, help="kernel as printed by ncu, e.g. 'tt_fast_item_kernel<4, 32, 32, 4, 1, 1, 0>'"
    )
    ap.add_argument("--cubin", default=None, help="a cubin built with -lineinfo (default: compile one here)")
    ap.add_argument(
        "--file",
        default="tt_cuda_fast.cuh",
        help="charge inlined helpers to call sites in this file ('': their own lines)",
    )
    ap.add_argument("--top", type=int, default=30, help="lines to print")
    ap.add_argument("--insns", type=int, default=0, help="also the N instructions with the most samples")
    args = ap.parse_args()

    samples = read_samples(args.csv)
    if args.kernel not in samples:
        sys.exit(f"ncu_source_lines.py: no kernel {args.kernel!r} in {args.csv}; it has {sorted(samples)}")
    rows = samples[args.kernel]
    with tempfile.TemporaryDirectory() as tmp:
        table = line_table(args.cubin or compile_cubin(tmp), args.kernel, args.file)
    ran = [_opcode(r["Source"]) for r in rows]
    built = [op for _, op in table]
    if len(ran) != len(built) or any(a != b for a, b in zip(ran, built, strict=True)):
        sys.exit(
            f"ncu_source_lines.py: the kernel built here ({len(built)} instructions) is not the one profiled ({len(ran)})"
        )

    stall_cols = [c for c in rows[0] if c.startswith("stall_") and not c.endswith("(Not Issued)")]
    per_line: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (where, _), r in zip(table, rows, strict=True):
        c = per_line[where]
        c["samples"] += int(r["Warp Stall Sampling (All Samples)"] or 0)
        c["insts"] += int(r["Instructions Executed"] or 0)
        for s in stall_cols:
            c[s] += int(r[s] or 0)
    total = sum(c["samples"] for c in per_line.values()) or 1
    insts = sum(c["insts"] for c in per_line.values())
    print(f"{args.kernel}: {total} samples, {insts} warp instructions executed, {len(built)} SASS instructions")
    sources: dict[str, list[str]] = {}
    for where, c in sorted(per_line.items(), key=lambda kv: -kv[1]["samples"])[: args.top]:
        file, line = where.rsplit(":", 1)
        path = next(
            (
                os.path.join(d, file)
                for d in ("csrc/tt_embedding_bag", "csrc/include")
                if os.path.exists(os.path.join(d, file))
            ),
            None,
        )
        if path and path not in sources:
            with open(path) as f:
                sources[path] = f.read().splitlines()
        text = sources[path][int(line) - 1].strip()[:70] if path else ""
        top = sorted(stall_cols, key=lambda s: -c[s])[:2]
        why = ", ".join(f"{s[6:]} {100 * c[s] / max(c['samples'], 1):.0f}%" for s in top if c[s])
        print(f"{100 * c['samples'] / total:5.1f}% {c['samples']:7d} {c['insts']:10d}  {where:28s} {why:38s} {text}")
    if args.insns:
        print(
            f"\nthe {args.insns} instructions with the most samples (index in the kernel, share, executed, line, stalls):"
        )
        count = [int(r["Warp Stall Sampling (All Samples)"] or 0) for r in rows]
        for i in sorted(range(len(rows)), key=lambda i: -count[i])[: args.insns]:
            r = rows[i]
            top = sorted(stall_cols, key=lambda s: -int(r[s] or 0))[:2]
            why = ", ".join(f"{s[6:]} {r[s]}" for s in top if int(r[s] or 0))
            print(
                f"{i:6d} {100 * count[i] / total:5.1f}% {r['Instructions Executed']:>9s}  {table[i][0]:28s} {why:30s} {r['Source'].strip()[:60]}"
            )


if __name__ == "__main__":
    main()
