#!/usr/bin/env bash
# Accuracy parity of TT vs uncompressed tables (the numbers in benchmarks/results/accuracy_*.md).
#
#   bash benchmarks/run_accuracy_parity.sh movielens   # MovieLens-100k, 5 splits x {tt, none}  (~9 min, 2 cores)
#   bash benchmarks/run_accuracy_parity.sh kaggle      # synthetic Criteo-Kaggle-sized, {none, tt} (~2 x 10 min)
#
# Every run is `python examples/train_dlrm.py --nproc 2 ...` (2 CPU processes, gloo); its
# summary.json lands in $OUT/<name>/ and one JSON line per run is appended to $OUT/results.jsonl.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
which=${1:?usage: run_accuracy_parity.sh movielens|kaggle}
OUT=${OUT:-$root/runs/parity_$which}
NPROC=${NPROC:-2}
mkdir -p "$OUT"
cd "$root"

run() {  # run NAME ARGS...
  local name=$1; shift
  local dir="$OUT/$name"
  rm -rf "$dir"
  echo "[parity] $name: $py examples/train_dlrm.py --nproc $NPROC $* --out_dir $dir" >&2
  local t0=$SECONDS
  "$py" examples/train_dlrm.py --nproc "$NPROC" "$@" --out_dir "$dir" --progress_bar false --resume false \
    >"$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log" >&2; exit 1; }
  "$py" - "$dir/summary.json" "$name" "$((SECONDS - t0))" "$*" >>"$OUT/results.jsonl" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
keep = ["compression", "steps", "samples_seen", "train_samples_per_s", "embedding_params_uncompressed",
        "embedding_params_stored", "compression_ratio", "val_auc", "test_auc", "test_loss", "best_val_step",
        "best_val_auc", "test_auc_at_best_val", "test_oracle_auc", "wall_s"]
row = {"run": sys.argv[2], "wall_s_total": int(sys.argv[3]), "args": sys.argv[4], **{k: s.get(k) for k in keep}}
print(json.dumps(row))
PY
  tail -1 "$OUT/results.jsonl" >&2
}

case "$which" in
  movielens)
    # 5 random 80/10/10 splits (data_seed) and inits (seed); test AUC at the best validation AUC.
    for seed in 0 1 2 3 4; do
      for c in none tt; do
        run "ml100k_${c}_split${seed}" --yaml_config configs/movielens100k.yaml --compression "$c" \
          --seed "$seed" --data_seed "$seed" ${MOVIELENS_PATH:+--movielens_path "$MOVIELENS_PATH"}
      done
    done
    ;;
  kaggle)
    for c in none tt; do
      # 2000 steps x 2 ranks x 2048 = 8.2M fresh samples; validation at 1000 and 2000; test at the end
      run "kaggle_synth_${c}" --yaml_config configs/criteo_kaggle.yaml --compression "$c" --checkpoint_every 0 \
        ${KAGGLE_ARGS:-}
    done
    ;;
  *) echo "unknown: $which" >&2; exit 2 ;;
esac
echo "[parity] results: $OUT/results.jsonl" >&2
