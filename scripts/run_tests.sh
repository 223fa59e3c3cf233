#!/usr/bin/env bash
# The test command: set up the environment (scripts/setup_env.sh), lint, run the CPU test suite.
#   bash scripts/run_tests.sh [extra pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
venv=${TORCHREC_TT_VENV:-$root/.venv}
cd "$root"
# The suite must exercise the compiled C++ kernels whenever they were built (tests/test_info.py).
if [ "${TORCHREC_TT_BUILD_EXT:-1}" != "0" ]; then export TORCHREC_TT_EXPECT_CPP=1; fi
"$venv/bin/ruff" check .
exec "$venv/bin/python" -m pytest -m "not gpu" -q "$@"
