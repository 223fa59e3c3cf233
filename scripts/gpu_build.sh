#!/usr/bin/env bash
# Build the CUDA extension in place (so the checkout imports torchrec_tt._C) on the GPU machine.
#
#   bash scripts/gpu_build.sh LOG     # the build's output goes to LOG; exit status of the build
#
# One C++ compiler for every object, the one whose libstdc++ the process loads at run
# time: seen 2026-11-22 on the GPU image, Python's sysconfig/CXX compiler
# /opt/gcc/bin/g++ (newer libstdc++ headers) built the .cpp files while nvcc used
# /usr/bin/g++ 13; the .so then held std::ostream code of the wrong libstdc++ and any
# `ostream << long` in it (every error message, shape formatting) segfaulted.
# Environment: TORCHREC_TT_CXX=/path/to/g++ picks another compiler; TORCH_CUDA_ARCH_LIST
# (default 9.0 = sm_90); MAX_JOBS (default: all cores); PYTHON (default python3).
set -uo pipefail
log=${1:?usage: gpu_build.sh LOG}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cxx=${TORCHREC_TT_CXX:-}
if [ -z "$cxx" ] && [ -x /usr/bin/g++ ]; then cxx=/usr/bin/g++; fi
if [ -n "$cxx" ]; then
  export CXX=$cxx CC=${cxx%++}cc LDSHARED="$cxx -shared" NVCC_CCBIN=$cxx
  [ -x "$CC" ] || CC=$(dirname "$cxx")/gcc
fi
echo "[gpu_build] CXX=${CXX:-default}: $(${CXX:-g++} -dumpfullversion 2>/dev/null), NVCC_CCBIN=${NVCC_CCBIN:-default}" >&2
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "${PYTHON:-python3}" setup.py build_ext --inplace >"$log" 2>&1
