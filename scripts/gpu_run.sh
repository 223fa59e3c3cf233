#!/usr/bin/env bash
# One run on a bare GPU machine: offline setup, build, GPU tests, benchmark; a short table last.
#
#   bash scripts/gpu_run.sh
#
# Environment:
#   OUT            where logs and results go (default benchmarks/results/latest)
#   WHEELS         carried wheels for scripts/gpu_setup.sh (default .whl; skipped if absent)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (sm_90, H100/H200)
#   PYTEST_ARGS    extra pytest arguments (default: -q)
#   BENCH_ARGS     extra arguments of benchmarks/bench_tt_embedding_bag.py
#   SKIP_TESTS=1 / SKIP_BENCH=1   leave a stage out
#   SKIP_KERNEL_TESTS=1           leave out tests/test_cuda_kernels.py (the other GPU tests still run)
#   SKIP_OTHER_TESTS=1            leave out the other GPU test files (tests/test_cuda_kernels.py still runs)
#   TEST_TIMEOUT / BENCH_TIMEOUT  seconds a test stage / the benchmark may take (default 300 / 1200): a hung
#                                 kernel hangs its process, and a build whose tests timed out is not benchmarked
#   RUN_NCCL_CHECK=1              run the multi-GPU hook below (when >= 2 GPUs)
#   RUN_CACHE_BENCH=1             run benchmarks/bench_tt_cache.py (args: CACHE_BENCH_ARGS)
#   RUN_HOST_BENCH=1              run benchmarks/bench_host_overhead.py (host time per part of a step)
#   VARIANTS="A=1 B=2,C=3"        A/B runs: the benchmark again once per space-separated variant, with
#                                 its comma-separated VAR=value settings (args: VARIANT_BENCH_ARGS)
# Exit status: non-zero if the build, the tests or the benchmark failed.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_preamble.sh" || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=()
stamp() { echo "[gpu_run $(date +%H:%M:%S)] $*"; }

# 1. offline setup (torchrec + fbgemm-gpu-cpu for the torchrec-facing tests)
wheels=${WHEELS:-$root/.whl}
if [ -d "$wheels" ]; then
  stamp "setup from $wheels"
  if bash scripts/gpu_setup.sh "$wheels" /tmp/site; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    status+=("setup: FAILED")
  fi
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

# 2. build (sm_90 by default; one compiler for every object: scripts/gpu_build.sh)
stamp "build"
t0=$(date +%s)
if PYTHON=$py bash scripts/gpu_build.sh "$out/build.log"; then
  status+=("build: ok ($(( $(date +%s) - t0 )) s)")
else
  status+=("build: FAILED (see build.log)")
  tail -40 "$out/build.log"
fi
"$py" -c 'import torchrec_tt as t; print("HAS_CPP_KERNELS", t.HAS_CPP_KERNELS, "HAS_CUDA_KERNELS", t.HAS_CUDA_KERNELS)' || true

# 3. GPU tests
# A kernel that never finishes (a full-mask shuffle that some lanes skip did, 2026-12-07) hangs the
# test process: each stage runs under a time limit, and a timed-out stage stops the benchmark.
test_limit=${TEST_TIMEOUT:-300}
hung=0
test_status() {  # NAME RC SUMMARY
  if [ "$2" = 124 ] || [ "$2" = 137 ]; then
    hung=1
    status+=("$1: TIMED OUT after ${test_limit} s (a hung kernel?) ${3}")
  else
    status+=("$1: rc=$2 ${3}")
  fi
}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # The CUDA-kernel tests run in a pytest process of their own (no torchrec /
  # fbgemm-gpu-cpu imported by other test modules; a crash in one run does not hide the
  # other run's results).
  if [ "${SKIP_KERNEL_TESTS:-0}" != 1 ]; then
    stamp "pytest -m gpu tests/test_cuda_kernels.py"
    # shellcheck disable=SC2086
    timeout -k 10 "$test_limit" "$py" -m pytest -m gpu -p no:cacheprovider ${PYTEST_ARGS:--q} tests/test_cuda_kernels.py 2>&1 \
      | tee "$out/pytest.log"
    rc=${PIPESTATUS[0]}
    summary=$(grep -E "passed|failed|error" "$out/pytest.log" | tail -1)
    test_status "CUDA kernel tests (pytest -m gpu tests/test_cuda_kernels.py)" "$rc" "$summary"
  fi
  if [ "${SKIP_OTHER_TESTS:-0}" != 1 ]; then
    stamp "pytest -m gpu (the other test files)"
    # shellcheck disable=SC2086
    timeout -k 10 "$test_limit" "$py" -m pytest -m gpu -p no:cacheprovider ${PYTEST_ARGS:--q} tests \
      --ignore=tests/test_cuda_kernels.py 2>&1 | tee "$out/pytest_other.log"
    rc=${PIPESTATUS[0]}
    summary=$(grep -E "passed|failed|error|no tests ran" "$out/pytest_other.log" | tail -1)
    [ "$rc" = 5 ] && rc=0  # no GPU tests collected there
    test_status "other GPU tests (pytest -m gpu tests)" "$rc" "$summary"
  fi
fi

# ---------------------------------------------------------------- multi-GPU check
# The sharded TT path on 2 GPUs through NCCL: TW / RW / CW / mixed plans, forward and fused
# optimizer steps against the unsharded module on the global batch (scripts/gpu_dist_check.py).
if [ "${RUN_NCCL_CHECK:-0}" = 1 ]; then
  ngpu=$(nvidia-smi -L | wc -l)
  if [ "$ngpu" -ge 2 ]; then
    stamp "2-GPU NCCL check of the sharded path"
    "$py" -m torch.distributed.run --standalone --nproc_per_node 2 scripts/gpu_dist_check.py 2>&1 | tee "$out/nccl_check.log"
    rc=${PIPESTATUS[0]}
    status+=("2-GPU NCCL sharded check (scripts/gpu_dist_check.py): rc=$rc")
  else
    status+=("2-GPU NCCL sharded check: FAILED (only $ngpu GPU)")
  fi
fi
# ----------------------------------------------------------------------------------

# 4. benchmark
if [ "$hung" = 1 ]; then
  status+=("benchmark: FAILED, not run (a test stage timed out)")
elif [ "${SKIP_BENCH:-0}" != 1 ]; then
  stamp "benchmark"
  # shellcheck disable=SC2086
  timeout -k 10 "${BENCH_TIMEOUT:-1200}" "$py" benchmarks/bench_tt_embedding_bag.py --device cuda --out-dir "$out" \
    ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
  rc=${PIPESTATUS[0]}
  status+=("benchmark: rc=$rc")
fi

# 4b. LFU cache benchmark
if [ "${RUN_CACHE_BENCH:-0}" = 1 ]; then
  stamp "cache benchmark"
  # shellcheck disable=SC2086
  "$py" benchmarks/bench_tt_cache.py --device cuda --out-dir "$out" ${CACHE_BENCH_ARGS:-} 2>&1 | tee "$out/bench_cache.log"
  rc=${PIPESTATUS[0]}
  status+=("cache benchmark: rc=$rc")
fi

# 4c. host overhead of the parts of a step
if [ "${RUN_HOST_BENCH:-0}" = 1 ]; then
  stamp "host overhead benchmark"
  "$py" benchmarks/bench_host_overhead.py --out "$out/host_overhead.json" 2>&1 | tee "$out/bench_host.log"
  status+=("host overhead benchmark: rc=${PIPESTATUS[0]}")
fi

# 4d. kernel variants (environment switches) timed in the same run
for variant in ${VARIANTS:-}; do
  stamp "benchmark variant $variant"
  tag=$(echo "$variant" | tr -c 'A-Za-z0-9_\n' '_')
  # shellcheck disable=SC2086
  env $(echo "$variant" | tr ',' ' ') "$py" benchmarks/bench_tt_embedding_bag.py --device cuda --out-dir "$out/variant_$tag" \
    ${VARIANT_BENCH_ARGS:-} >"$out/bench_variant_$tag.log" 2>&1
  status+=("benchmark variant $variant: rc=$?")
  sed -n '/^| optimizer/,/^$/p' "$out/variant_$tag"/*.md 2>/dev/null
done

# 5. summary
echo
echo "================ gpu_run summary ================"
"$py" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null
for s in "${status[@]}"; do echo "  $s"; done
md=$(ls -t "$out"/*.md 2>/dev/null | head -1)
[ -n "$md" ] && sed -n '/^| optimizer/,$p' "$md"
case "${status[*]}" in *FAILED*|*"TIMED OUT"*|*"rc=1"*|*"rc=2"*|*"rc=124"*|*"rc=137"*) exit 1 ;; esac
exit 0
