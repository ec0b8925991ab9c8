#!/usr/bin/env bash
# DP fine-tuning experiment (experiments/finetune.py): MNIST pre-training, then DP fine-tuning on
# Fashion-MNIST at ε ∈ {1, 3, 8} with each layer selection and each sparse method (same ε, same
# 300 private steps), and a selection × learning-rate sweep at ε = 3.
#   experiments/finetune.sh WORKDIR [EPSILONS]      e.g. experiments/finetune.sh /tmp/ft "1 3 8"
# Results: WORKDIR/eps*/{selection,sparse,lr}/results.csv (collected by experiments/finetune_table.py).
set -euo pipefail
W=${1:?usage: experiments/finetune.sh WORKDIR [EPSILONS]}
EPSILONS=${2:-"1 3 8"}
PY=${PYTHON:-python}
CFG=experiments/finetune.py:finetune
$PY -m dpjax.main --config=experiments/finetune.py:pretrain --workdir="$W/pretrain"
for eps in $EPSILONS; do
  common=(--config=$CFG --set=finetune.init_from="$W/pretrain" --set=dp.target_epsilon=$eps --capture)
  $PY launch/sweep.py "${common[@]}" --workdir="$W/eps$eps/selection" \
      --sweep=finetune.selection=all,head,last_blocks,bias
  $PY launch/sweep.py "${common[@]}" --workdir="$W/eps$eps/sparse" \
      --sweep=finetune.sparse.method=sparta,magnitude,random
  if [ "$eps" = 3 ]; then
    $PY launch/sweep.py "${common[@]}" --workdir="$W/eps$eps/lr" \
        --sweep=finetune.selection=all,head,last_blocks,bias --sweep=optimizer.learning_rate=0.25,4
  fi
done
