#!/usr/bin/env bash
# Bytes of SASS per CUDA kernel of tt_embedding_bag_cuda.cu for sm_90 (16 bytes per instruction),
# largest first, with registers and spills from ptxas. Needs nvcc, not a GPU: a check for code
# bloat before a device call (benchmarks/NOTES.md section 7: a 150 KB kernel stalled on
# instruction fetch). From the repository root, with the project's Python environment:
#
#   bash scripts/cuda_code_size.sh            # the 15 largest kernels
#   TOP=40 bash scripts/cuda_code_size.sh
#   LINES='fast_item_kernel<4, 32, 32, 4, true, true>' bash scripts/cuda_code_size.sh
#
# LINES (a regex on the demangled kernel name) adds, per matching kernel, its SASS instructions
# per source line (file:line of the call site for inlined code, with the most frequent opcodes):
# static counts, to be multiplied by trip counts by hand (benchmarks/NOTES.md, v16). It needs
# nvdisasm (NVDISASM, else PATH, else beside nvcc); without a CUDA toolkit, the wheel has it:
#   pip download --no-deps -d /tmp/w nvidia-cuda-nvdisasm && unzip -q /tmp/w/*.whl -d /tmp/w/x
#   NVDISASM=$(find /tmp/w/x -name nvdisasm -type f) LINES=... bash scripts/cuda_code_size.sh
#
# Environment: PYTHON (default .venv/bin/python, else python3), NVCC (default nvcc), TOP, LINES,
# NVDISASM, OPS (opcodes named per line, default 4), CUBIN (also keep the cubin at this path:
# scripts/ncu_source_lines.py builds its line table from it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvcc_bin=${NVCC:-nvcc}
src=csrc/tt_embedding_bag/tt_embedding_bag_cuda.cu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

includes=$("$py" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
# A CPU build of torch lacks this generated header; the kernels need none of its macros.
mkdir -p "$tmp/stub/c10/cuda/impl"
echo "#pragma once" >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
abi=$("$py" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")

# shellcheck disable=SC2086
"$nvcc_bin" -cubin "$src" -o "$tmp/tt.cubin" $includes -I"$tmp/stub" -Icsrc/include -std=c++17 \
  --expt-relaxed-constexpr -O3 -lineinfo -gencode arch=compute_90,code=sm_90 -DTORCHREC_TT_WITH_CUDA \
  -D_GLIBCXX_USE_CXX11_ABI="$abi" -Xptxas -v 2>"$tmp/ptxas.log"
if [ -n "${CUBIN:-}" ]; then cp "$tmp/tt.cubin" "$CUBIN"; fi

"$py" - "$tmp/tt.cubin" "$tmp/ptxas.log" "${TOP:-15}" <<'EOF'
import re
import subprocess
import sys

cubin, ptxas, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
symbols = subprocess.run(["readelf", "-sW", cubin], capture_output=True, text=True).stdout
sizes = {}
for line in symbols.splitlines():
    f = line.split()
    if len(f) >= 8 and f[3] == "FUNC":
        sizes[f[-1]] = int(f[2], 0)
usage, kernel = {}, None
for line in open(ptxas):
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        kernel = m.group(1)
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and kernel:
        usage.setdefault(kernel, {})["spill"] = int(m.group(1))
    m = re.search(r"Used (\d+) registers", line)
    if m and kernel:
        usage.setdefault(kernel, {})["regs"] = int(m.group(1))
names = subprocess.run(["c++filt"], input="\n".join(sizes), capture_output=True, text=True).stdout.splitlines()
short = dict(zip(sizes, names))
print(f"{'KB':>6} {'regs':>5} {'spill':>6}  kernel (sm_90)")
for sym, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]:
    u = usage.get(sym, {})
    name = re.sub(r"torchrec_tt::(\(anonymous namespace\)::|cuda_detail::)?|cub::CUB_\w+::detail::", "", short[sym])
    print(f"{size / 1024:6.1f} {u.get('regs', '-'):>5} {u.get('spill', '-'):>6}  {name[:100]}")
EOF

[ -n "${LINES:-}" ] || exit 0
nvdisasm_bin=${NVDISASM:-$(command -v nvdisasm || echo "$(dirname "$(command -v "$nvcc_bin")")/nvdisasm")}
[ -x "$nvdisasm_bin" ] || { echo "cuda_code_size.sh: nvdisasm not found (set NVDISASM; see the header)" >&2; exit 1; }
"$nvdisasm_bin" -c -gi "$tmp/tt.cubin" >"$tmp/tt.sass"
"$py" - "$tmp/tt.sass" "$LINES" <<'EOF'
import collections
import os
import re
import subprocess
import sys

sass, pattern = sys.argv[1], re.compile(sys.argv[2])
kernels, sym, where = {}, None, None
for line in open(sass):
    m = re.match(r"\.text\.(\S+):", line)
    if m:
        sym, where = m.group(1), None
        kernels[sym] = collections.defaultdict(collections.Counter)
        continue
    m = re.search(r'File "([^"]*)", line (\d+)', line)
    if m:
        where = (m.group(1).split("/")[-1], int(m.group(2)))
        continue
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
    if m and sym:
        kernels[sym][where][m.group(1)] += 1
names = subprocess.run(["c++filt"], input="\n".join(kernels), capture_output=True, text=True).stdout.splitlines()
for sym, name in zip(kernels, names):
    if not pattern.search(name):
        continue
    per_line = kernels[sym]
    print(f"\n{name}: {sum(sum(c.values()) for c in per_line.values())} instructions")
    for where in sorted(per_line, key=lambda w: (w is None, w or ("", 0))):
        ops = per_line[where]
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(int(os.environ.get("OPS", 4))))
        label = f"{where[0]}:{where[1]}" if where else "(no line)"
        print(f"  {label:28} {sum(ops.values()):5}  {top}")
EOF
