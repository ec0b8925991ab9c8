#!/usr/bin/env bash
# Runs the DP fine-tuning study at CIFAR scale (experiments/finetune_cifar.py; README in
# experiments/results/finetune_cifar/): one launch/sweep.py command per PART, seeds 0, 1, 2 (SEEDS),
# PARALLEL runs at a time on one GPU (default 4), the PARTs one after another (CONCURRENT=1: at once).
#
# Usage: bash experiments/finetune_cifar.sh OUTDIR PART...
#   pretrain    non-private pre-training on the public part     OUTDIR/R_pretrain/seed=S
#   selection   layer selections at ε = 1, 3, 8 (EPSILONS)      OUTDIR/R_selection/METHOD,R,M,...
#   sparse      sparta, magnitude, random at ε = 1, 3, 8        OUTDIR/R_sparse/...
#   lr          every method at ε = 3 and the two learning rates beside the default (LRS; the
#               default's runs are selection's and sparse's at ε = 3): the selection x lr grid
# Fine-tuning seed S starts from PRETRAIN_DIR/seed=S (default OUTDIR/R_pretrain; the same split:
# dpjax refuses another). On the GPU set PRETRAIN_DIR=/tmp/...: its checkpoints (~33 MB each) are
# too large to carry, a warm machine keeps /tmp, and a cold one pre-trains again (the pretrain
# part, first in every call, skips seeds finished there; it runs with deterministic GPU ops).
# REGIME=B (default) or A; MODEL=wrn (default) or vit; METHODS=all,head: a subset of the part's
# methods (a call's share of the grid; finished runs are skipped, so later calls add the rest).
set -euo pipefail
out=$1; shift
source "$(dirname "$0")/gpu_sweeps.sh"  # sweep, run_parts, SEEDS, PARALLEL, CONCURRENT
regime=${REGIME:-B}
model=${MODEL:-wrn}
eps=${EPSILONS:-1,3,8}
pretrain_dir=${PRETRAIN_DIR:-$out/${regime}_pretrain}
study=experiments/finetune_cifar.py
info() { $py "$study" "$1" "$model"; }  # the config's method lists and learning rates
configs() {  # configs METHOD...: one --config per method (METHODS keeps those it names)
  local m
  for m in "$@"; do
    if [[ -z "${METHODS:-}" || ",$METHODS," == *",$m,"* ]]; then
      echo "--config=$study:$m,$regime,$model"
    fi
  done
}
finetune() {  # finetune PART METHOD-LIST SWEEP.py-FLAGS...: the part's sweep from the pre-training
  local part=$1 methods=$2; shift 2
  local flags
  mapfile -t flags < <(configs ${methods//,/ })
  if (( ${#flags[@]} == 0 )); then echo "METHODS=$METHODS names none of $methods" >&2; return 2; fi
  sweep "${regime}_$part" "${flags[@]}" --config_in_name \
      --set="finetune.init_from=$pretrain_dir/seed={seed}" "$@"
}
run_part() {  # run_part PART
  case $1 in
    pretrain) (out=$(dirname "$pretrain_dir")
               export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
               sweep "$(basename "$pretrain_dir")" "--config=$study:pretrain,$regime,$model") ;;
    selection) finetune selection "$(info selections)" --sweep=dp.target_epsilon=$eps ;;
    sparse) finetune sparse "$(info sparse)" --sweep=dp.target_epsilon=$eps ;;
    lr) finetune lr "$(info methods)" --set=dp.target_epsilon=3 \
            --sweep=optimizer.learning_rate=${LRS:-$(info other_learning_rates)} ;;
    *) echo "unknown part $1" >&2; return 2 ;;
  esac
}
run_parts run_part "$@"
