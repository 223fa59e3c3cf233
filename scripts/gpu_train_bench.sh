#!/usr/bin/env bash
# Training throughput of the Criteo Kaggle DLRM (configs/criteo_kaggle.yaml) with TT tables vs
# uncompressed tables, on 1 and 2 GPUs (torchrun, NCCL), for a fixed number of steps.
# Prints one JSON line per run and writes them to $OUT/gpu_train_throughput.jsonl
# (copy the file to benchmarks/results/ and commit it with the device name).
#
#   bash scripts/gpu_train_bench.sh                 # on the GPU machine, from the repository root
#
# Environment:
#   OUT          results folder (default benchmarks/results/latest)
#   WHEELS       carried wheels (default .whl): scripts/gpu_setup.sh's set, including its training
#                extras (pyyaml, tqdm, torchmetrics 1.0.3, lightning-utilities, packaging); SKIP_SETUP=1 to skip
#   SKIP_BUILD=1 do not (re)build the CUDA extension
#   STEPS        training steps per run (default 300; the first log window, 50 steps, is warm-up
#                and excluded from samples/s)
#   BATCH_SIZE   per-GPU batch (default: the config's 2048)
#   GPUS         GPU counts to run (default "1 2")
#   CONFIGS      configs to run (default configs/criteo_kaggle.yaml; e.g. add
#                configs/criteo_kaggle_ttrec.yaml for TT-Rec's 3-core rank-32 shapes)
#   EXTRA_ARGS   more train_dlrm.py flags
# Each run draws its batches from a pool of 32 pre-generated synthetic batches per rank
# (--synthetic_pool_batches 32), so data generation does not limit the GPU; no evaluation,
# no checkpoints. "none" on a machine without FBGEMM's CUDA build runs the uncompressed tables
# inside TTEmbeddingBagCollection (one-core TT lookups): summary field embedding_module says which.
source "$(dirname "${BASH_SOURCE[0]}")/gpu_preamble.sh" || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
stamp() { echo "[gpu_train_bench $(date +%H:%M:%S)] $*" >&2; }

# 1. offline setup: torchrec + fbgemm-gpu-cpu (gpu_setup.sh) and the training extras
wheels=${WHEELS:-$root/.whl}
if [ "${SKIP_SETUP:-0}" != 1 ] && [ -d "$wheels" ]; then
  stamp "setup from $wheels"
  bash scripts/gpu_setup.sh "$wheels" /tmp/site || { stamp "gpu_setup.sh failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import yaml, numpy, torchmetrics, torchrec" || {
  stamp "missing modules: carry pyyaml/torchmetrics/lightning-utilities/packaging wheels in $wheels"; exit 1; }
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
"$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(), "x", torch.cuda.device_count())'

# 2. build the CUDA kernels in place
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  stamp "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
  PYTHON=$py bash scripts/gpu_build.sh "$out/train_bench_build.log" || { tail -30 "$out/train_bench_build.log"; exit 1; }
fi
"$py" -c 'import torchrec_tt as t; print("HAS_CUDA_KERNELS", t.HAS_CUDA_KERNELS)'

# 3. runs
results="$out/gpu_train_throughput.jsonl"
: >"$results"
steps=${STEPS:-300}
status=0
for config in ${CONFIGS:-configs/criteo_kaggle.yaml}; do
for gpus in ${GPUS:-1 2}; do
  if [ "$gpus" -gt "$ngpu" ]; then stamp "skip $gpus GPUs (only $ngpu)"; continue; fi
  for compression in tt none; do
    name="$(basename "$config" .yaml)_${compression}_${gpus}gpu"
    dir="$out/train_bench/$name"
    rm -rf "$dir"
    stamp "$name"
    # shellcheck disable=SC2086
    "$py" -m torch.distributed.run --standalone --nproc_per_node "$gpus" examples/train_dlrm.py \
      --yaml_config "$config" --compression "$compression" --device cuda \
      --train_steps "$steps" --log_every 50 --eval_every 0 --val_at_end false --test_at_end false \
      --checkpoint_every 0 --resume false --synthetic_pool_batches 32 --num_workers 0 --progress_bar false \
      ${BATCH_SIZE:+--batch_size $BATCH_SIZE} --out_dir "$dir" ${EXTRA_ARGS:-} >"$out/$name.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ] || [ ! -f "$dir/summary.json" ]; then
      stamp "$name FAILED (rc=$rc), see $out/$name.log"; tail -20 "$out/$name.log"; status=1; continue
    fi
    "$py" - "$dir/summary.json" "$name" >>"$results" <<'PY'
import json, sys, torch
s = json.load(open(sys.argv[1]))
keys = ["compression", "embedding_module", "tt_tables", "world_size", "global_batch_size", "steps", "train_samples_per_s",
        "embedding_params_uncompressed", "embedding_params_stored", "compression_ratio", "wall_s"]
print(json.dumps({"run": sys.argv[2], "device": torch.cuda.get_device_name(), **{k: s.get(k) for k in keys}}))
PY
    tail -1 "$results"
  done
done
done
stamp "results: $results"
exit $status
