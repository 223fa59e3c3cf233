#!/usr/bin/env bash
# A checkout of another revision for an A/B run on the GPU machine (which gets no .git): the tree of
# REV under DIR (default build/base_<short rev>), ready to carry and to name in BASELINES of
# scripts/gpu_ab.sh. Prints DIR.
#
#   bash scripts/prepare_baseline.sh 665d375            # -> build/base_665d375
#   bash scripts/prepare_baseline.sh HEAD build/v10
set -euo pipefail
rev=${1:?usage: prepare_baseline.sh REV [DIR]}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
sha=$(git rev-parse --short "$rev^{commit}")
dir=${2:-build/base_$sha}
rm -rf "$dir"
mkdir -p "$dir"
git archive "$sha" | tar -x -C "$dir"
echo "$sha" >"$dir/.baseline_rev"
echo "$dir"
