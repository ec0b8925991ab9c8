#!/usr/bin/env bash
# The main job: installs what is needed (first run only) and runs DP continual pre-training on
# Fashion-MNIST (public: 10% of the training set, from classes 0-4 only; private: the rest; ε = 3
# at δ = 1e-5), then prints a results table.
#
# Usage: bash launch/run.sh [VARIANT ...]
#   VARIANT: dp (default), private_only, public_only, nonprivate, or all (the four, ~15 min on 2 CPUs)
# Environment: DPJAX_DATA_DIR (default ../shared/data), WORKDIR (default ./workdir),
#   DATA (default fashion_mnist_5classes; fashion_mnist: the public 10% from all classes).
# Rerunning resumes each run from its latest checkpoint in $WORKDIR/<DATA>_<variant>.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh"
export DPJAX_DATA_DIR="${DPJAX_DATA_DIR:-$root/../shared/data}"
python="${DPJAX_VENV:-$root/.venv}/bin/python"
workdir="${WORKDIR:-$root/workdir}"
data="${DATA:-fashion_mnist_5classes}"
variants=("${@:-dp}")
[ "${variants[0]}" = all ] && variants=(dp private_only public_only nonprivate)
cd "$root"
dirs=()
for v in "${variants[@]}"; do
  "$python" -m dpjax.main --config="experiments/continual.py:$v,$data" \
    --workdir="$workdir/${data}_$v" --progress="${PROGRESS:-true}"
  dirs+=("$workdir/${data}_$v")
done
"$python" -m dpjax.report "${dirs[@]}"
