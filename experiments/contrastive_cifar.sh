#!/usr/bin/env bash
# Runs the CIFAR contrastive pre-training study of issue 29 §1 (experiments/contrastive_cifar.py;
# experiments/results/contrastive_cifar/README.md): one launch/sweep.py command per part, seeds
# 0, 1, 2 (SEEDS), PARALLEL runs at a time on one GPU.
#
# Usage: bash experiments/contrastive_cifar.sh OUTDIR PART...   with PART:
#   baselines    random_init (batch 128's config; no training) and nonprivate at batch 128 and 512
#   logit128     Logit-DP, expected batch 128, at ε = 3, 8 (EPSILONS=8: one of them)
#   naive128     naive per-row DP, expected batch 128, at ε = 3, 8
#   logit512     Logit-DP, expected batch 512, at ε = 3, 8
#   naive512     naive per-row DP, expected batch 512, at ε = 3, 8
# EPOCHS=0.5 sets every run's steps to round(EPOCHS · 50,000 / batch) (default: the config's, one
# epoch); CONCURRENT=1 runs the PARTs at once (each run gets 0.9/(PARALLEL × parts) of the GPU
# memory), else one after another. Then: python experiments/contrastive_table.py --cells OUTDIR.
# On the GPU machine (device tool) run it after `source launch/device_env.sh`.
set -euo pipefail
out=$1; shift
source "$(dirname "$0")/gpu_sweeps.sh"  # sweep, run_parts, py, SEEDS, PARALLEL, CONCURRENT
eps=${EPSILONS:-3,8}
config() { echo "--config=experiments/contrastive_cifar.py:$1,$2"; }
steps() {  # steps BATCH: --set flags for EPOCHS, if given
  [[ -z "${EPOCHS:-}" ]] && return 0
  local n
  n=$($py -c "print(max(1, round($EPOCHS * 50000 / $1)))")
  echo "--set=schedule.total_steps=$n --set=eval.every_steps=$(( (n + 1) / 2 ))"
}
run_part() {  # run_part PART
  local part=$1
  case $part in
    baselines)  # two sweeps: EPOCHS sets each batch's steps
      # shellcheck disable=SC2046  # steps: word-split flags
      sweep baselines128 "$(config random_init 128)" "$(config nonprivate 128)" $(steps 128)
      # shellcheck disable=SC2046
      sweep baselines512 "$(config nonprivate 512)" $(steps 512) ;;
    logit128|naive128|logit512|naive512)
      local method=${part%%[0-9]*} batch=${part##*[a-z]}
      [[ $method == logit ]] && method=logit_dp
      # shellcheck disable=SC2046
      sweep "$part" "$(config "$method" "$batch")" --sweep=dp.target_epsilon="$eps" \
          $(steps "$batch") ;;
    *) echo "unknown part $part" >&2; return 2 ;;
  esac
}
run_parts run_part "$@"
