#!/usr/bin/env bash
# DP contrastive pre-training experiment (experiments/contrastive.py): Fashion-MNIST SimCLR-style
# pre-training with Logit-DP and the naive per-row DP baseline at each ε, non-private training and
# the untrained encoder; linear probes on Fashion-MNIST and MNIST; the table.
#   experiments/contrastive.sh WORKDIR [EPSILONS] [EXTRA FLAGS...]
#   e.g. PARALLEL=1 experiments/contrastive.sh /tmp/con "3 8" --config.schedule.total_steps=1000
# PARALLEL=1 runs every variant at once (one GPU holds them all); otherwise one after another.
# Results: WORKDIR/<variant>/results.json, the table on stdout (experiments/contrastive_table.py).
set -euo pipefail
W=${1:?usage: experiments/contrastive.sh WORKDIR [EPSILONS] [EXTRA FLAGS...]}
EPSILONS=${2:-"3 8"}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-python}
mkdir -p "$W"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # parallel runs share the GPU's memory
run() {
  local name=$1 method=$2; shift 2
  local cmd=("$PY" -m dpjax.main --config=experiments/contrastive.py:"$method" --workdir="$W/$name"
             --noprogress "$@")
  echo "${cmd[*]}" > "$W/$name.cmd"
  if [ "${PARALLEL:-0}" = 1 ]; then "${cmd[@]}" > "$W/$name.log" 2>&1 &
  else "${cmd[@]}" 2>&1 | tee "$W/$name.log"; fi
}
run random_init random_init "$@"
run nonprivate nonprivate "$@"
for eps in $EPSILONS; do
  run "logit_dp_eps$eps" logit_dp --config.dp.target_epsilon="$eps" "$@"
  run "naive_eps$eps" naive --config.dp.target_epsilon="$eps" "$@"
done
wait
$PY experiments/contrastive_table.py "$W"
