#!/usr/bin/env bash
# Prepare a CPU machine that has only python3: a virtual environment with the verified
# working set (torch 2.13 CPU, fbgemm-gpu-cpu 1.8, torchrec 1.8) and torchrec_tt installed
# in editable mode with its C++ kernels compiled. Idempotent: a second run only rebuilds
# what changed in csrc/.
#
#   bash scripts/setup_env.sh            # creates ./.venv
#   TORCHREC_TT_VENV=/path bash scripts/setup_env.sh
#   TORCHREC_TT_BUILD_EXT=0 ...          # skip the C++ build (reference kernels only)
#   TORCHREC_TT_DEP_SET=gpu ...          # the GPU machine's set instead (torch 2.11.0, fbgemm-gpu-cpu 1.6.0,
#                                        # torchrec 1.6.1; PyPI's torch 2.11 is a CUDA build, ~4.6 GB):
#                                        # scripts/test_gpu_set_on_cpu.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TORCHREC_TT_VENV:-$root/.venv}
python=${PYTHON:-python3}
log() { echo "[setup_env] $*" >&2; }
case "${TORCHREC_TT_DEP_SET:-cpu}" in
  cpu) torch_v=2.13.0 fbgemm_v=1.8.0 torchrec_v=1.8.0 ;;
  gpu) torch_v=2.11.0 fbgemm_v=1.6.0 torchrec_v=1.6.1 ;;
  *) log "TORCHREC_TT_DEP_SET must be cpu or gpu, not '${TORCHREC_TT_DEP_SET}'"; exit 2 ;;
esac
deps_id="torch==$torch_v fbgemm-gpu-cpu==$fbgemm_v torchrec==$torchrec_v r3"

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)
if [ "$(cat "$venv/.torchrec_tt_deps" 2>/dev/null)" != "$deps_id" ]; then
  log "installing dependencies (about a minute)"
  # torchrec with --no-deps: its metadata would pull the 465 MB CUDA fbgemm-gpu.
  # setuptools >= 70.1 builds the editable wheel below (torch 2.13 pulls it; 2.11 on Python 3.11 does not)
  "${pip[@]}" install -q "torch==$torch_v" "fbgemm-gpu-cpu==$fbgemm_v" "setuptools>=70.1" numpy pyyaml pytest ruff ninja \
    expecttest
  "${pip[@]}" install -q --no-deps "torchrec==$torchrec_v"
  "${pip[@]}" install -q tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath
  # Editable install of the Python package only; the extension is built in place below.
  TORCHREC_TT_BUILD_EXT=0 "${pip[@]}" install -q --no-build-isolation --no-deps -e "$root"
  echo "$deps_id" > "$venv/.torchrec_tt_deps"
fi
if [ "${TORCHREC_TT_BUILD_EXT:-1}" != "0" ]; then
  log "building the C++ kernels (incremental)"
  (cd "$root" && MAX_JOBS=${MAX_JOBS:-2} "$py" setup.py -q build_ext --inplace >"$venv/build_ext.log" 2>&1) \
    || { cat "$venv/build_ext.log" >&2; log "C++ build failed"; exit 1; }
fi
"$py" -c "import torchrec_tt, logging; print('torchrec_tt', torchrec_tt.__version__, 'C++ kernels:', torchrec_tt.HAS_CPP_KERNELS)"
