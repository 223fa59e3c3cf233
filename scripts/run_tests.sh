#!/usr/bin/env bash
# The test command: set up the environment (scripts/setup_env.sh), lint, run the CPU test suite.
#   bash scripts/run_tests.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
venv=${TORCHREC_TT_VENV:-$root/.venv}
cd "$root"
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -m "not gpu" -q "$@"
