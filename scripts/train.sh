#!/usr/bin/env bash
# The main job of the README: set up the environment, then train DLRM with TT-compressed tables
# on the built-in synthetic Criteo-like data (configs/dlrm_small.yaml: Criteo Kaggle's 26 tables
# capped at 200k rows, the 7 largest in TT format, 300 steps of 2 x 1024 samples).
#
#   bash scripts/train.sh                       # 2 CPU processes (gloo), or one per GPU (NCCL)
#   bash scripts/train.sh --compression none    # any train_dlrm.py flag is passed on
#   NPROC=4 bash scripts/train.sh               # number of worker processes
#
# A few minutes on 2 CPU cores (setup included, once the dependencies are cached). Metrics go
# to runs/dlrm_small/metrics.csv, the closing summary to runs/dlrm_small/summary.json. Running
# it again resumes from the last checkpoint in runs/dlrm_small/checkpoints (add --resume false,
# or delete the directory, for a fresh run).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
venv=${TORCHREC_TT_VENV:-$root/.venv}
py="$venv/bin/python"
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ -n "${NPROC:-}" ]; then
  nproc=$NPROC
elif [ "$gpus" -gt 0 ]; then
  nproc=$gpus
else
  nproc=2
fi
echo "[train.sh] $nproc worker processes ($([ "$gpus" -gt 0 ] && echo "$gpus GPU(s), NCCL" || echo "CPU, gloo"))" >&2
cd "$root"
exec "$py" examples/train_dlrm.py --nproc "$nproc" --yaml_config configs/dlrm_small.yaml "$@"
