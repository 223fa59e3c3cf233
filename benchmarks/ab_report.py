#!/usr/bin/env python3
"""Same-machine comparison of CUDA kernel versions from their benchmark logs.

Reads the stdout logs of ``benchmarks/bench_tt_embedding_bag.py --device cuda --profile BxL``
(one per version, all run on one machine in one session, e.g. by ``scripts/gpu_run.sh`` with
``BASELINES``) and writes a markdown report: the device time per training step of each group
of kernels (from the torch.profiler kernel table of each profiled case) and each version's
results table.

Example::

    python benchmarks/ab_report.py --title "v10 against v9" v10=out/bench.log v9=out/baselines/v9/bench.log
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

# Kernel groups, in report order: (column title, pattern searched in the kernel name); the
# first match wins. Item kernels: the backward flag is the fast kernel's 5th template argument
# and the generic one's last; reductions: the kind is the 3rd (0 plain sums, 1 / 2 T^T dT).
GROUPS: list[tuple[str, re.Pattern[str]]] = [
    ("backward item", re.compile(r"tt_fast_item_kernel<(\d+, ){4}true|tt_item_kernel<[^<>]*, true>")),
    ("forward item", re.compile(r"tt_(fast_)?item_kernel<")),
    ("T^T dT sums", re.compile(r"tt_reduce_kernel<[^,<>]+, [^,<>]+, [12]\b")),
    ("plain sums", re.compile(r"tt_reduce_kernel<")),
    ("tail", re.compile(r"tt_reduce_tail_kernel")),
    ("sorts and scans", re.compile(r"cub::|tt_digit_\w+_kernel|tt_sort_index_kernel")),
    ("pooling", re.compile(r"tt_pool_kernel")),
    ("other", re.compile(r"")),
]
_CASE = re.compile(r"^Kernel time of (\d+) TT steps at B=(\d+), L=(\d+):")
_TIME = re.compile(r"([\d.]+)(us|ms|s)$")


@dataclass
class Profile:
    """Kernel time of one profiled case: microseconds per step by group."""

    batch: int
    pooling: int
    steps: int
    per_step: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.per_step.values())


@dataclass
class BenchLog:
    """What a benchmark log holds: its results table and its kernel profiles."""

    table: list[str]
    profiles: list[Profile]


def _us(token: str) -> float:
    m = _TIME.match(token)
    if m is None:
        raise ValueError(f"not a profiler time: {token!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1.0, "ms": 1e3, "s": 1e6}[unit]


def group_of(name: str) -> str:
    """The report column a kernel belongs to.

    Args:
        name: the kernel name as torch.profiler prints it (possibly truncated).

    Returns:
        The first group of ``GROUPS`` whose test accepts the name.

    Example:
        >>> group_of("void torchrec_tt::(anonymous namespace)::tt_reduce_tail_kernel<float, float>(...)")
        'tail'
    """
    return next(title for title, pattern in GROUPS if pattern.search(name))


def parse_log(text: str) -> BenchLog:
    """Parses one benchmark log.

    Args:
        text: stdout of ``bench_tt_embedding_bag.py`` (with ``--profile``).

    Returns:
        The last results table (markdown rows) and every kernel profile. A kernel row is a
        device activity (zero host time, non-zero device time); the profiler's own
        "Activity Buffer Request" and the operator rows are skipped.

    Example:
        >>> parse_log("| optimizer | ids |\\n|---|---|\\n| sgd | uniform |\\n").table[-1]
        '| sgd | uniform |'
    """
    lines = text.splitlines()
    table: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith("| optimizer |"):
            table = [line]
            for rest in lines[i + 1 :]:
                if not rest.startswith("|"):
                    break
                table.append(rest)
    profiles = []
    for i, line in enumerate(lines):
        m = _CASE.match(line)
        if m is None:
            continue
        prof = Profile(batch=int(m.group(2)), pooling=int(m.group(3)), steps=int(m.group(1)))
        for row in lines[i + 1 :]:
            if row.startswith("Self CPU time total"):
                break
            cols = row.split()
            # Name ... Self CPU % | Self CPU | CPU total % | CPU total | CPU avg | Self CUDA | Self CUDA % | CUDA total | CUDA avg | calls
            if len(cols) < 11 or not cols[-1].isdigit() or not cols[-4].endswith("%"):
                continue
            self_cpu, self_cuda = _us(cols[-9]), _us(cols[-5])
            if self_cpu != 0.0 or self_cuda == 0.0:
                continue
            name = " ".join(cols[:-10])
            group = group_of(name)
            prof.per_step[group] = prof.per_step.get(group, 0.0) + self_cuda / prof.steps
        profiles.append(prof)
    return BenchLog(table=table, profiles=profiles)


def report(title: str, logs: dict[str, BenchLog]) -> str:
    """The markdown report of several versions' logs (first version first).

    Args:
        title: the report's heading.
        logs: version name -> its parsed log.

    Returns:
        Markdown: per profiled case a table of kernel time per step by group, then each
        version's results table.

    Example:
        >>> report("t", {"a": BenchLog(table=[], profiles=[])}).splitlines()[0]
        '# t'
    """
    out = [f"# {title}", ""]
    cases = sorted({(p.batch, p.pooling) for log in logs.values() for p in log.profiles})
    titles = [t for t, _ in GROUPS]
    for batch, pooling in cases:
        out += [f"Kernel time per step at B = {batch}, L = {pooling} (torch.profiler, us):", ""]
        out.append("| version | " + " | ".join(titles) + " | all kernels |")
        out.append("|---" * (len(titles) + 2) + "|")
        for name, log in logs.items():
            for p in log.profiles:
                if (p.batch, p.pooling) == (batch, pooling):
                    cells = [f"{p.per_step[t]:.1f}" if t in p.per_step else "-" for t in titles]
                    out.append(f"| {name} | " + " | ".join(cells) + f" | {p.total:.1f} |")
        out.append("")
    for name, log in logs.items():
        out += [f"{name}:", ""] + (log.table or ["(no results table in the log)"]) + [""]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="NAME=PATH of a benchmark log, the version under test first")
    ap.add_argument("--title", default="Same-machine comparison", help="report heading")
    ap.add_argument("--out", default=None, help="write the report here (default: stdout)")
    args = ap.parse_args()
    logs = {}
    for spec in args.logs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"expected NAME=PATH, got {spec!r}")
        logs[name] = parse_log(Path(path).read_text())
    text = report(args.title, logs)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
