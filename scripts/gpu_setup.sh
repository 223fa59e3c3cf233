#!/usr/bin/env bash
# Prepare a bare GPU machine (Python 3.12 + CUDA torch preinstalled, no package registry)
# from wheels carried in a folder: fbgemm-gpu-cpu 1.6.0, torchrec 1.6.1, tensordict,
# iopath, pyvers (download them on a connected machine with
# ../shared/tools/gpu_wheels.sh .whl, or any `pip download` of the same set).
#
#   bash scripts/gpu_setup.sh [WHEEL_DIR=.whl] [TARGET=/tmp/site]
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
#
# Optional wheels in the same folder are installed too: pyyaml, tqdm, torchmetrics 1.0.3,
# lightning-utilities and packaging (what examples/train_dlrm.py needs beyond torchrec).
#
# Offline: pip runs with --no-index --no-deps; torchrec's wheel is tagged py311, so it
# is unzipped into TARGET instead of installed. Nothing outside TARGET is touched.
# torchrec 1.8 does not import with fbgemm-gpu-cpu 1.6 (the one built for torch 2.11).
set -euo pipefail
whl=$(cd "${1:-.whl}" && pwd)
site=${2:-/tmp/site}
py=${PYTHON:-python3}
mkdir -p "$site"
shopt -s nullglob
wheels=("$whl"/fbgemm_gpu_cpu-*.whl "$whl"/tensordict-*.whl "$whl"/iopath-*.whl "$whl"/pyvers-*.whl)
torchrec=("$whl"/torchrec-*.whl)
if [ ${#wheels[@]} -lt 4 ] || [ ${#torchrec[@]} -lt 1 ]; then
  echo "gpu_setup.sh: expected fbgemm_gpu_cpu, tensordict, iopath, pyvers and torchrec wheels in $whl" >&2
  ls -la "$whl" >&2 || true
  exit 1
fi
for pat in "pyyaml-*.whl" "PyYAML-*.whl" "tqdm-*.whl" "torchmetrics-*.whl" "lightning_utilities-*.whl" "packaging-*.whl"; do
  for w in "$whl"/$pat; do wheels+=("$w"); done
done
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
(cd "$site" && "$py" -m zipfile -e "${torchrec[0]}" .)
echo "gpu_setup.sh: installed into $site:" $(cd "$site" && ls -d */ | grep -v dist-info | tr -d / | tr '\n' ' ')
echo "gpu_setup.sh: now export PYTHONPATH=$site:\$PYTHONPATH"
