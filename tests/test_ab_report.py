"""benchmarks/ab_report.py: kernel groups and per-step times read from a benchmark log."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ab_report.py"
_spec = importlib.util.spec_from_file_location("ab_report", SCRIPT)
ab_report = importlib.util.module_from_spec(_spec)
sys.modules["ab_report"] = ab_report  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(ab_report)

# An excerpt of a real log (2026-12-06, H100), rows cut to the ones the groups need, plus one
# generic-kernel row per group that the fast path does not launch. Columns: Name, Self CPU %,
# Self CPU, CPU total %, CPU total, CPU time avg, Self CUDA, Self CUDA %, CUDA total, CUDA time avg, calls.
_ROWS = [
    ("torchrec_tt::tt_embedding_bag_backward_fused_", "25.77%", "1.879ms", "1.401ms", "5"),
    (
        "void torchrec_tt::cuda_detail::tt_fast_item_kernel<4, 32, 32, 4, true, true>(torchrec_t...",
        "0.00%",
        "0.000us",
        "900.854us",
        "5",
    ),
    (
        "void torchrec_tt::cuda_detail::tt_fast_item_kernel<4, 32, 32, 4, false, true>(torchrec_...",
        "0.00%",
        "0.000us",
        "318.917us",
        "5",
    ),
    (
        "void torchrec_tt::(anonymous namespace)::tt_item_kernel<float, float, true>(torchrec_tt...",
        "0.00%",
        "0.000us",
        "10.000us",
        "5",
    ),
    (
        "void torchrec_tt::(anonymous namespace)::tt_reduce_kernel<float, float, 0, 0>(torchrec_...",
        "0.00%",
        "0.000us",
        "162.596us",
        "5",
    ),
    (
        "void torchrec_tt::(anonymous namespace)::tt_reduce_kernel<c10::Half, float, 2, 6>(torch...",
        "0.00%",
        "0.000us",
        "1.000ms",
        "5",
    ),
    (
        "void torchrec_tt::(anonymous namespace)::tt_reduce_tail_kernel<float, float>(torchrec_t...",
        "0.00%",
        "0.000us",
        "148.485us",
        "5",
    ),
    (
        "void cub::CUB_300001_SM_900::detail::radix_sort::DeviceRadixSortOnesweepKernel<cub::CUB...",
        "0.00%",
        "0.000us",
        "137.348us",
        "15",
    ),
    ("Activity Buffer Request", "45.38%", "3.310ms", "125.218us", "2"),
    ("Memset (Device)", "0.00%", "0.000us", "57.408us", "55"),
    (
        "void torchrec_tt::(anonymous namespace)::tt_pool_kernel<float4, float4, float>(float4 c...",
        "0.00%",
        "0.000us",
        "27.425us",
        "5",
    ),
    ("cudaLaunchKernel", "8.69%", "633.867us", "0.000us", "110"),
]


def _log(steps=5, batch=4096, pooling=20):
    rows = [
        f"{name:>90}  {scpu_pct:>12}  {scpu:>12}  {'1.00%':>12}  {'1.000us':>12}  {'1.000us':>12}  "
        f"{scuda:>12}  {'1.00%':>12}  {scuda:>12}  {'1.000us':>12}  {calls:>12}"
        for name, scpu_pct, scpu, scuda, calls in _ROWS
    ]
    header = f"{'Name':>90}  Self CPU %  Self CPU  CPU total %  CPU total  CPU time avg  Self CUDA  Self CUDA %  CUDA total  CUDA time avg  # of Calls"
    return "\n".join(
        [
            "INFO:root:B: 4096, L: 20",
            "| optimizer | ids | B | L | TT us/nnz |",
            "|---|---|---|---|---|",
            "| sgd | uniform | 4096 | 20 | 0.0053 |",
            "",
            f"Kernel time of {steps} TT steps at B={batch}, L={pooling}:",
            "-" * 40,
            header,
            "-" * 40,
            *rows,
            "-" * 40,
            "Self CPU time total: 7.294ms",
            "Self CUDA time total: 2.024ms",
        ]
    )


def test_groups_and_per_step_times():
    log = ab_report.parse_log(_log())
    assert log.table == [
        "| optimizer | ids | B | L | TT us/nnz |",
        "|---|---|---|---|---|",
        "| sgd | uniform | 4096 | 20 | 0.0053 |",
    ]
    (p,) = log.profiles
    assert (p.batch, p.pooling, p.steps) == (4096, 20, 5)
    # by hand: device rows only (no operator rows, no Activity Buffer Request), divided by 5 steps
    expected = {
        "backward item": (900.854 + 10.0) / 5,
        "forward item": 318.917 / 5,
        "plain sums": 162.596 / 5,
        "T^T dT sums": 1000.0 / 5,
        "tail": 148.485 / 5,
        "sorts and scans": 137.348 / 5,
        "other": 57.408 / 5,
        "pooling": 27.425 / 5,
    }
    assert p.per_step.keys() == expected.keys()
    for k, v in expected.items():
        assert p.per_step[k] == pytest.approx(v), k
    assert p.total == pytest.approx(sum(expected.values()))


def test_report_cli_lists_every_version(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text(_log())
    b.write_text(_log(steps=10))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--title", "A vs B", f"new={a}", f"old={b}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "# A vs B"
    new = next(line for line in lines if line.startswith("| new |"))
    old = next(line for line in lines if line.startswith("| old |"))
    # totals by hand: sum of the device rows, per step
    device_sum = 900.854 + 318.917 + 10.0 + 162.596 + 1000.0 + 148.485 + 137.348 + 57.408 + 27.425
    assert float(new.split("|")[-2]) == pytest.approx(device_sum / 5, abs=0.05)
    assert float(old.split("|")[-2]) == pytest.approx(device_sum / 10, abs=0.05)
    assert out.count("| sgd | uniform | 4096 | 20 | 0.0053 |") == 2


def test_bad_spec_is_rejected():
    r = subprocess.run([sys.executable, str(SCRIPT), "no-equals-sign"], capture_output=True, text=True)
    assert r.returncode != 0 and "expected NAME=PATH" in r.stderr


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def test_gpu_ab_script_builds_benchmarks_and_reports(tmp_path):
    # scripts/gpu_ab.sh in a scratch tree whose GPU steps are stand-ins: gpu_run.sh writes this
    # checkout's benchmark log, baseline b1 builds and benchmarks, baseline b2 fails to build.
    repo = Path(__file__).resolve().parent.parent
    root = tmp_path / "tree"
    for script in ("gpu_ab.sh", "gpu_preamble.sh"):
        _write(root / "scripts" / script, (repo / "scripts" / script).read_text(), 0o755)
    _write(root / "benchmarks" / "ab_report.py", SCRIPT.read_text())
    (tmp_path / "this.log").write_text(_log())
    (tmp_path / "base.log").write_text(_log(steps=10))
    _write(
        root / "scripts" / "gpu_run.sh", f'cp {tmp_path / "this.log"} "$OUT/bench.log"\necho "BENCH_ARGS=$BENCH_ARGS"\n'
    )
    for name, build_rc in (("b1", 0), ("b2", 1)):
        _write(root / "build" / name / "scripts" / "gpu_build.sh", f'echo built >"$1"\nexit {build_rc}\n')
        _write(
            root / "build" / name / "benchmarks" / "bench_tt_embedding_bag.py",
            f"import sys\nprint(' '.join(sys.argv[1:]))\nprint(open({str(tmp_path / 'base.log')!r}).read())\n",
        )
    out = tmp_path / "out"
    env = {
        "PATH": "/usr/bin:/bin",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "BASELINES": "build/b1 build/b2",
    }
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_ab.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stdout + r.stderr  # b2's build failed
    assert "BENCH_ARGS=--profile 4096x20" in r.stdout
    assert "b2: build FAILED" in r.stdout and "b1: benchmark rc=0" in r.stdout
    assert (out / "baselines" / "b1" / "bench.log").read_text().startswith("--device cuda --out-dir")
    assert "--dists uniform --optimizers sgd --profile 4096x20" in (out / "baselines" / "b1" / "bench.log").read_text()
    report = (out / "same_machine.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| this |", "| b1 |", "| b2 |"))]
    assert [row.split("|")[1].strip() for row in rows] == ["this", "b1"]
    summary = r.stdout.split("gpu_ab summary")[1]
    assert "| this |" in summary and "| b1 |" in summary  # the kernel-time table, printed
    assert float(rows[0].split("|")[-2]) == pytest.approx(2 * float(rows[1].split("|")[-2]), abs=0.1)
