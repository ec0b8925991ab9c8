#!/usr/bin/env bash
# The test command: installs what the tests need into .venv (first run only) and runs the suite.
# Usage: bash launch/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh"
export DPJAX_DATA_DIR="${DPJAX_DATA_DIR:-$root/../shared/data}"
cd "$root"
# --durations: the slowest tests, so each run says where the suite's time goes (WORKSPACE.md).
exec "${DPJAX_VENV:-$root/.venv}/bin/python" -m pytest -n 2 --dist loadfile --durations=30 "$@"
