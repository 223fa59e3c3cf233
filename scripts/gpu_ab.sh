#!/usr/bin/env bash
# A/B run on one GPU machine: this checkout through scripts/gpu_run.sh (setup, build, GPU tests,
# benchmark), then other checkouts built beside it and benchmarked after it on the same GPU, and a
# same-machine report of kernel time per step (benchmarks/ab_report.py) in $OUT/same_machine.md.
#
#   bash scripts/prepare_baseline.sh 665d375                  # here: build/base_665d375 (carry it)
#   BASELINES="build/base_665d375" bash scripts/gpu_ab.sh     # there
#
# The device tool brings back at most 8 files from $OUT, two folders down: write the results one
# level below and pack them (the command used on 2026-12-06, carrying .whl and the baselines):
#   mkdir -p $OUT/o; OUT=$OUT/o BASELINES="build/base_665d375" bash scripts/gpu_ab.sh >$OUT/ab.log 2>&1;
#   tar -czf $OUT/o.tgz -C $OUT o; rm -rf $OUT/o
#
# Environment (and every variable of scripts/gpu_run.sh; BENCH_ARGS defaults to --profile 4096x20):
#   OUT                  results folder (default benchmarks/results/latest)
#   BASELINES            space-separated checkout folders (their own scripts/gpu_build.sh builds them)
#   BASELINE_BENCH_ARGS  their benchmark arguments (default: --dists uniform --optimizers sgd --profile 4096x20)
#   BASELINE_TESTS=1     also run their tests/test_cuda_kernels.py (under TEST_TIMEOUT, default 300 s; a
#                        baseline whose tests time out is not benchmarked)
# Exit status: gpu_run.sh's, or 1 if a baseline failed to build or to run.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_preamble.sh" || exit 1
site=/tmp/site  # where scripts/gpu_setup.sh (run by gpu_run.sh) installs the carried wheels
baseline_args=${BASELINE_BENCH_ARGS:---dists uniform --optimizers sgd --profile 4096x20}

declare -A build_pid
for b in ${BASELINES:-}; do
  name=$(basename "$b")
  mkdir -p "$out/baselines/$name"
  (cd "$b" && PYTHON=$py bash scripts/gpu_build.sh "$out/baselines/$name/build.log") &
  build_pid[$b]=$!
done

OUT=$out BENCH_ARGS=${BENCH_ARGS:---profile 4096x20} bash scripts/gpu_run.sh
rc=$?

logs=("this=$out/bench.log")
status=()
for b in ${BASELINES:-}; do
  name=$(basename "$b")
  d=$out/baselines/$name
  if ! wait "${build_pid[$b]}"; then
    status+=("$name: build FAILED ($d/build.log)")
    rc=1
    continue
  fi
  if [ "${BASELINE_TESTS:-0}" = 1 ]; then
    (cd "$b" && PYTHONPATH=$PWD:$site timeout -k 10 "${TEST_TIMEOUT:-300}" "$py" -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_cuda_kernels.py) >"$d/pytest.log" 2>&1
    trc=$?
    status+=("$name: CUDA kernel tests rc=$trc $(grep -E "passed|failed|error" "$d/pytest.log" | tail -1)")
    if [ "$trc" = 124 ] || [ "$trc" = 137 ]; then
      status+=("$name: tests TIMED OUT (a hung kernel?), not benchmarked")
      rc=1
      continue
    fi
  fi
  # shellcheck disable=SC2086
  (cd "$b" && PYTHONPATH=$PWD:$site timeout -k 10 "${BENCH_TIMEOUT:-1200}" "$py" benchmarks/bench_tt_embedding_bag.py \
    --device cuda --out-dir "$d" $baseline_args) >"$d/bench.log" 2>&1
  brc=$?
  status+=("$name: benchmark rc=$brc")
  [ "$brc" = 0 ] && logs+=("$name=$d/bench.log") || rc=1
done

if [ ${#logs[@]} -gt 1 ]; then
  gpu=$("$py" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)
  "$py" benchmarks/ab_report.py --title "Same machine: this checkout against ${BASELINES}, ${gpu}, $(date -u +%F)" \
    --out "$out/same_machine.md" "${logs[@]}" || rc=1
fi
echo
echo "================ gpu_ab summary ================"
for s in "${status[@]}"; do echo "  $s"; done
# the kernel-time heading and its table (up to the first line after the table)
[ -f "$out/same_machine.md" ] && awk '/^Kernel time per step/ {f = 1} f && t && !/^\|/ {exit} f {print} f && /^\|/ {t = 1}' "$out/same_machine.md"
exit "$rc"
