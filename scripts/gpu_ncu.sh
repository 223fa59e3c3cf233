#!/usr/bin/env bash
# Nsight Compute on the CUDA TT kernels of one training step (seed table, fused SGD): where
# the item kernels and reductions wait (benchmarks/NOTES.md section 6, item 1). On the GPU
# machine, from the repository root, after the build (scripts/gpu_run.sh, or SKIP_BUILD=0 here):
#
#   bash scripts/gpu_ncu.sh                      # B = 4096 x 20 and 16384 x 20
#   CASES="65536x1" bash scripts/gpu_ncu.sh
#
# Writes to $OUT (default benchmarks/results/latest): per case an .ncu-rep report (open it
# with the Nsight Compute GUI) and a text summary of every profiled kernel (details page:
# speed of light, occupancy, launch statistics, warp-state stall reasons), small enough to
# come back from the machine. `--clock-control none` keeps the GPU's clocks as they are
# (the device notes ask for that); ncu replays each kernel 38 times under --set full, ~15 s per
# kernel on an H100: a case (6 kernels) takes ~90 s. Environment:
#   OUT         results folder
#   CASES       space-separated BxL cases (default "4096x20 16384x20")
#   KERNELS     ncu kernel-name regex (default: the fast item kernels and the reductions)
#   NCU_SET     ncu section set (default "full")
#   SKIP_BUILD  1 (default): the extension is already built; 0: run scripts/gpu_build.sh first
#   SOURCE      1: also the source page per SASS instruction (.source_sass.csv), with the warp-stall
#               samples of every instruction; scripts/ncu_source_lines.py sums them per CUDA source
#               line (no GPU needed). This ncu's CSV of the CUDA view carries no metrics, so it
#               is not exported. First run on 2026-12-07 (results/2026-12-07e_*_ncu_source_lines_*).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_preamble.sh" || exit 1
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
if [ "${SKIP_BUILD:-1}" != 1 ]; then
  PYTHON=$py bash scripts/gpu_build.sh "$out/build.log" || { tail -30 "$out/build.log"; exit 1; }
fi
ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu_bin" ] || { echo "gpu_ncu.sh: ncu not found" >&2; exit 1; }
kernels=${KERNELS:-regex:tt_fast_item_kernel|tt_reduce_kernel|tt_reduce_tail_kernel}
rc=0
for case in ${CASES:-4096x20 16384x20}; do
  B=${case%x*}
  L=${case#*x}
  rep="$out/ncu_B${B}_L${L}"
  echo "[gpu_ncu] B=$B L=$L -> $rep.ncu-rep"
  "$ncu_bin" --clock-control none --profile-from-start off --set "${NCU_SET:-full}" --import-source yes \
    -k "$kernels" -f -o "$rep" "$py" scripts/ncu_tt_step.py --batch-size "$B" --pooling-factor "$L" \
    >"$rep.log" 2>&1 || { rc=1; tail -20 "$rep.log"; continue; }
  "$ncu_bin" -i "$rep.ncu-rep" --page details --print-units base >"$rep.txt" 2>&1 || rc=1
  # stall cycles per issued instruction, by reason (which wait dominates each kernel)
  "$ncu_bin" -i "$rep.ncu-rep" --page raw --print-units base \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" >"$rep.stalls.txt" 2>&1 || true
  if [ "${SOURCE:-0}" = 1 ]; then
    "$ncu_bin" -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.source_sass.csv" 2>&1 || rc=1
  fi
  grep -E "tt_fast_item_kernel|tt_reduce|Duration|Achieved Occupancy|Registers Per Thread|Stall|Warp Cycles Per Issued" \
    "$rep.txt" | head -80
done
exit $rc
