# Sourced by the GPU machine scripts (gpu_run.sh, gpu_ab.sh, gpu_ncu.sh, gpu_codec_bench.sh,
# gpu_train_bench.sh): strict mode, the repository root as working directory ($root), the
# results folder $out (OUT, or benchmarks/results/${default_results:-latest}) created, and the
# Python to use ($py: PYTHON, default python3).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${OUT:-$root/benchmarks/results/${default_results:-latest}}
mkdir -p "$out"
py=${PYTHON:-python3}
