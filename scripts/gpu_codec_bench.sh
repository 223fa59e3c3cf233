#!/usr/bin/env bash
# Communication codecs on 2 GPUs: FP32 vs FP16/BF16 (torchrec) vs the error-bounded codecs
# (torchrec_tt.distributed.comm_codec), three stages, results in $OUT:
#
#   1. micro: benchmarks/bench_comm_codec.py (torchrun, NCCL): bytes on the wire, all-to-all
#      time (encode / collective / decode, forward and forward+backward) and error, on
#      26 tables x dim 128, batch 16384 per GPU (also dim 16, batch 2048: the Kaggle shape),
#      with eager and torch.compile'd codec kernels        -> *_comm_codec*.json / .md
#   2. e2e: examples/train_dlrm.py step throughput per codec, STEPS steps from a pool of
#      synthetic batches, no evaluation: configs/criteo_kaggle.yaml as is (dim 16) and a
#      comm-heavy variant (dim 128, batch 8192 per GPU, every table table-wise)
#                                                           -> e2e_throughput.jsonl
#   3. auc: configs/dlrm_small.yaml (synthetic data with a planted signal, 300 steps,
#      validation + test at the end) per codec, same seed  -> auc.jsonl
#   and a markdown summary of 2 and 3                        -> comm_codec_gpu_summary.md
#
#   bash scripts/gpu_codec_bench.sh                # on the GPU machine, from the repository root
#   STAGES=micro bash scripts/gpu_codec_bench.sh   # one stage (each appends to the same $OUT)
#
# Rough cost on 2 GPUs: setup ~10 s, CUDA build (stages e2e/auc) ~2-3 min, micro ~2 min, e2e 14 runs
# of ~30 s, auc 7 runs of ~30 s; run the stages separately where a command has a time limit.
#
# Environment:
#   OUT          results folder (default benchmarks/results/<date>_comm_codec_gpu)
#   WHEELS       carried wheels (default .whl; see scripts/gpu_train_bench.sh); SKIP_SETUP=1 to skip
#   SKIP_BUILD=1 do not (re)build the CUDA extension (the TT kernels of stages 2 and 3)
#   STAGES       subset of "micro e2e auc" (default all three)
#   CODECS       e2e/auc codecs (default "none fp16 bf16 eb8 eb4 eb_adaptive eb8+compile"; NAME+compile
#                runs NAME with torch.compile'd codec kernels)
#   STEPS        e2e steps per run (default 300; the first 50-step log window is warm-up)
#   NPROC        GPUs (default 2)
#   EXTRA_ARGS   more train_dlrm.py flags for stages 2 and 3 (appended last: they override)
#   MICRO_ARGS   more bench_comm_codec.py flags for stage 1 (appended last)
#   DEVICE       cuda (default) or cpu (gloo; only to try the script out on a CPU machine)
default_results=$(date +%F)_comm_codec_gpu
source "$(dirname "${BASH_SOURCE[0]}")/gpu_preamble.sh" || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
stamp() { echo "[gpu_codec_bench $(date +%H:%M:%S)] $*" >&2; }
stages=${STAGES:-micro e2e auc}
nproc=${NPROC:-2}
codecs=${CODECS:-none fp16 bf16 eb8 eb4 eb_adaptive eb8+compile}
device=${DEVICE:-cuda}
status=0

# 0. offline setup (torchrec + fbgemm-gpu-cpu + training extras: gpu_setup.sh) and the CUDA build
wheels=${WHEELS:-$root/.whl}
if [ "${SKIP_SETUP:-0}" != 1 ] && [ -d "$wheels" ]; then
  stamp "setup from $wheels"
  bash scripts/gpu_setup.sh "$wheels" /tmp/site || { stamp "gpu_setup.sh failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import yaml, torchmetrics, torchrec" || { stamp "missing modules (torchrec / pyyaml / torchmetrics)"; exit 1; }
"$py" -c 'import torch, torchrec; print("torch", torch.__version__, "torchrec", torchrec.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "x", torch.cuda.device_count())'
if [ "$device" = cuda ] && [ "${SKIP_BUILD:-0}" != 1 ] && [[ " $stages " == *" e2e "* || " $stages " == *" auc "* ]]; then
  stamp "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
  PYTHON=$py bash scripts/gpu_build.sh "$out/build.log" || { stamp "build failed (see build.log): reference kernels"; }
fi
"$py" -c 'import torchrec_tt as t; print("HAS_CUDA_KERNELS", t.HAS_CUDA_KERNELS)'
run_dist() { "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "$@"; }

# 1. micro-benchmark of the all-to-all
if [[ " $stages " == *" micro "* ]]; then
  stamp "micro: 26 x 128, batch 16384 per GPU"
  # shellcheck disable=SC2086
  run_dist benchmarks/bench_comm_codec.py --device "$device" --compile --out-dir "$out" ${MICRO_ARGS:-} 2>&1 \
    | tee "$out/micro_dim128.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  stamp "micro: 26 x 16, batch 2048 per GPU (Kaggle shape)"
  # shellcheck disable=SC2086
  run_dist benchmarks/bench_comm_codec.py --device "$device" --compile --dim 16 --batch-per-rank 2048 --tag kaggle_dim16 \
    --out-dir "$out" ${MICRO_ARGS:-} 2>&1 | tee "$out/micro_dim16.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

# one train_dlrm.py run: NAME CODEC RESULTS_FILE args...
train_run() {
  local name=$1 spec=$2 results=$3
  shift 3
  local codec=${spec%+compile} opts=(--comm_codec "${spec%+compile}")
  [ "$spec" != "$codec" ] && opts+=(--comm_codec_options "{compile: true}")
  local dir="$out/runs/$name"
  rm -rf "$dir"
  stamp "$name"
  # shellcheck disable=SC2086
  run_dist examples/train_dlrm.py --device "$device" "${opts[@]}" --out_dir "$dir" \
    --checkpoint_every 0 --resume false --progress_bar false "$@" ${EXTRA_ARGS:-} >"$out/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] || [ ! -f "$dir/summary.json" ]; then
    stamp "$name FAILED (rc=$rc), see $out/$name.log"; tail -20 "$out/$name.log"; status=1; return
  fi
  "$py" - "$dir/summary.json" "$name" "$spec" >>"$results" <<'PY'
import json, sys, torch
s = json.load(open(sys.argv[1]))
keys = ["compression", "embedding_module", "world_size", "global_batch_size", "steps", "train_samples_per_s",
        "val_auc", "test_auc", "test_loss", "test_oracle_auc", "wall_s", "comm_codec_stats"]
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(json.dumps({"run": sys.argv[2], "codec": sys.argv[3], "device": dev,
                  **{k: s.get(k) for k in keys}}))
PY
  tail -1 "$results"
}

# 2. end-to-end step throughput
if [[ " $stages " == *" e2e "* ]]; then
  results="$out/e2e_throughput.jsonl"
  : >"$results"
  steps=${STEPS:-300}
  common=(--train_steps "$steps" --log_every 50 --eval_every 0 --val_at_end false --test_at_end false
          --synthetic_pool_batches 32 --num_workers 0)
  for spec in $codecs; do
    train_run "kaggle_dim16_${spec}" "$spec" "$results" --yaml_config configs/criteo_kaggle.yaml "${common[@]}"
  done
  for spec in $codecs; do
    train_run "kaggle_dim128_tw_${spec}" "$spec" "$results" --yaml_config configs/criteo_kaggle.yaml "${common[@]}" \
      --embedding_dim 128 --dense_arch_layer_sizes 512,256,128 --batch_size 8192 --sharding table_wise
  done
fi

# 3. AUC on the synthetic data
if [[ " $stages " == *" auc "* ]]; then
  results="$out/auc.jsonl"
  : >"$results"
  for spec in $codecs; do
    train_run "dlrm_small_${spec}" "$spec" "$results" --yaml_config configs/dlrm_small.yaml --num_workers 0
  done
fi

# summary table
"$py" - "$out" >"$out/comm_codec_gpu_summary.md" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    p = out / name
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
def comp(r):
    st = r.get("comm_codec_stats") or {}
    w = sum(v.get("wire_bytes", 0) for v in st.values()); f = sum(v.get("fp32_bytes", 0) for v in st.values())
    return f"{f / w:.2f}x" if w else ""
print(f"# Comm codecs on {out.name}\n")
e2e = rows("e2e_throughput.jsonl")
if e2e:
    print("## End-to-end step throughput (samples/s, after the first 50-step window)\n")
    print("| run | codec | samples/s | vs none | a2a bytes vs FP32 (eb codecs) |\n|---|---|---|---|---|")
    base = {r["run"].rsplit("_", 1)[0]: r["train_samples_per_s"] for r in e2e if r["codec"] == "none"}
    for r in e2e:
        b = base.get(r["run"][: -len(r["codec"]) - 1])
        rel = f"{r['train_samples_per_s'] / b:.3f}" if b and r["train_samples_per_s"] else ""
        print(f"| {r['run']} | {r['codec']} | {r['train_samples_per_s']} | {rel} | {comp(r)} |")
auc = rows("auc.jsonl")
if auc:
    print("\n## AUC, configs/dlrm_small.yaml (synthetic, 300 steps, seed 0)\n")
    print("| codec | val AUC | test AUC | test AUC - none | test log loss | a2a bytes vs FP32 |\n|---|---|---|---|---|---|")
    base = next((r["test_auc"] for r in auc if r["codec"] == "none"), None)
    for r in auc:
        d = f"{r['test_auc'] - base:+.4f}" if base is not None and r.get("test_auc") is not None else ""
        print(f"| {r['codec']} | {r.get('val_auc')} | {r.get('test_auc')} | {d} | {r.get('test_loss')} | {comp(r)} |")
for md in sorted(out.glob("*_comm_codec*.md")):
    print("\n" + md.read_text())
PY
cat "$out/comm_codec_gpu_summary.md"
stamp "results in $out"
exit $status
