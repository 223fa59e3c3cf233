#!/usr/bin/env bash
# The CPU test suite under the GPU machine's software set (torch 2.11.0, torchrec 1.6.1,
# fbgemm-gpu-cpu 1.6.0), run on a CPU machine: the code must work with both sets, and CI only
# runs the CPU set (scripts/setup_env.sh).
#
#   bash scripts/test_gpu_set_on_cpu.sh [extra pytest args]
#
# Needs PyPI: its torch 2.11.0 for x86_64 is a CUDA build, ~4.6 GB with its NVIDIA libraries, in
# .venv-gpuset (reused on later runs). The tree of HEAD is copied to build/gpuset_src (committed
# code only) and its C++ kernels built there without CUDA, so the checkout's own build, made for
# the CPU set's torch, is left alone. Environment: GPUSET_VENV (default .venv-gpuset), PYTHON
# (default python3, 3.11 or 3.12).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${GPUSET_VENV:-$root/.venv-gpuset}
deps_id="torch==2.11.0 fbgemm-gpu-cpu==1.6.0 torchrec==1.6.1 r1"
log() { echo "[test_gpu_set_on_cpu] $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)
if [ "$(cat "$venv/.torchrec_tt_deps" 2>/dev/null)" != "$deps_id" ]; then
  log "installing the GPU set (a few minutes, ~4.6 GB)"
  "${pip[@]}" install -q torch==2.11.0 fbgemm-gpu-cpu==1.6.0 numpy pyyaml pytest ninja expecttest
  "${pip[@]}" install -q --no-deps torchrec==1.6.1
  "${pip[@]}" install -q tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath
  echo "$deps_id" > "$venv/.torchrec_tt_deps"
fi

src=$root/build/gpuset_src
rm -rf "$src"
mkdir -p "$src"
git archive HEAD | tar -x -C "$src"
log "building the C++ kernels of $(git rev-parse --short HEAD) in $src (no CUDA)"
(cd "$src" && USE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$py" setup.py -q build_ext --inplace >"$src/build_ext.log" 2>&1) \
  || { cat "$src/build_ext.log" >&2; log "C++ build failed"; exit 1; }
cd "$src"
"$py" -c 'import torch, torchrec_tt; print("torch", torch.__version__, "torchrec_tt C++ kernels:", torchrec_tt.HAS_CPP_KERNELS)'
# the examples' subprocesses import torchrec_tt from the copied tree
PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH} TORCHREC_TT_EXPECT_CPP=1 CUDA_VISIBLE_DEVICES= \
  exec "$py" -m pytest -m "not gpu" -q -p no:cacheprovider "$@"
