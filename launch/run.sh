#!/usr/bin/env bash
# The main job: installs what is needed (first run only) and runs DP continual pre-training on
# Fashion-MNIST (10% public, 90% private, ε = 3 at δ = 1e-5), then prints a results table.
#
# Usage: bash launch/run.sh [VARIANT ...]
#   VARIANT: dp (default), private_only, public_only, nonprivate, or all (the four, ~15 min on 2 CPUs)
# Environment: DPJAX_DATA_DIR (default ../shared/data), WORKDIR (default ./workdir).
# Rerunning resumes each run from its latest checkpoint in $WORKDIR/fmnist_<variant>.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh"
export DPJAX_DATA_DIR="${DPJAX_DATA_DIR:-$root/../shared/data}"
python="${DPJAX_VENV:-$root/.venv}/bin/python"
workdir="${WORKDIR:-$root/workdir}"
variants=("${@:-dp}")
[ "${variants[0]}" = all ] && variants=(dp private_only public_only nonprivate)
cd "$root"
dirs=()
for v in "${variants[@]}"; do
  "$python" -m dpjax.main --config="experiments/continual.py:$v" \
    --workdir="$workdir/fmnist_$v" --progress="${PROGRESS:-true}"
  dirs+=("$workdir/fmnist_$v")
done
"$python" -m dpjax.report "${dirs[@]}"
