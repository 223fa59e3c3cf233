#!/usr/bin/env bash
# The CPU test suite under the GPU machine's software set (torch 2.11.0, torchrec 1.6.1,
# fbgemm-gpu-cpu 1.6.0), run on a CPU machine: the code must work with both sets, and CI only
# runs the CPU set (scripts/setup_env.sh).
#
#   bash scripts/test_gpu_set_on_cpu.sh [extra pytest args]
#
# Needs PyPI: its torch 2.11.0 for x86_64 is a CUDA build, ~4.6 GB with its NVIDIA libraries, in
# .venv-gpuset (reused on later runs). The tree of HEAD is copied to build/gpuset_src (committed
# code only) and set up there by its own scripts/setup_env.sh (TORCHREC_TT_DEP_SET=gpu: editable
# install of the copy, C++ kernels built without CUDA), so the checkout's own build, made for the
# CPU set's torch, is left alone. Environment: GPUSET_VENV (default .venv-gpuset), PYTHON (default
# python3, 3.11 or 3.12), MAX_JOBS.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
src=$root/build/gpuset_src
rm -rf "$src"
mkdir -p "$src"
git archive HEAD | tar -x -C "$src"
venv=$(realpath -m "${GPUSET_VENV:-$root/.venv-gpuset}")
echo "[test_gpu_set_on_cpu] $(git rev-parse --short HEAD) in $src, venv $venv" >&2
cd "$src"  # also for setup_env.sh's closing import check: the checkout's own torchrec_tt is not on the path
USE_CUDA=0 TORCHREC_TT_DEP_SET=gpu TORCHREC_TT_VENV=$venv bash scripts/setup_env.sh
TORCHREC_TT_EXPECT_CPP=1 CUDA_VISIBLE_DEVICES= exec "$venv/bin/python" -m pytest -m "not gpu" -q -p no:cacheprovider "$@"
