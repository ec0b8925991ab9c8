#!/usr/bin/env bash
# Runs the cifar10_jpeg study of Bu et al. (2024) (see experiments/results/bu2024_cifar/README.md):
# one launch/sweep.py command per figure, three seeds each, PARALLEL runs at a time on one GPU.
#
# Usage: bash experiments/bu2024_cifar.sh OUTDIR PART...   with PART = REGIME_FIGURE:
#   R_baselines   public-only, non-private (all data), clipping-only DP-from-scratch (σ = 0)
#   R_switch      public steps then DP, switch step 0 (= private-only DP) / 50 / 100 / 200
#   R_auto        the automatic switch (efficiency criterion)
#   R_plateau     the automatic switch on the held-out public loss alone
#   R_accplateau  the same on the held-out public accuracy (its error): mixing.auto.plateau_metric
#   R_lookahead   the automatic switch on simulated DP steps on public data (dpjax/lookahead.py)
#   R_relplateau  the plateau with a relative threshold (5% of the best held-out loss, 2 checks)
#   R_autowindow  the efficiency criterion with the public generalisation over 3 checks, not 1
#   R_augmult     private-only DP and switch 200 with augmentation multiplicity K = AUGMULTS
#                 (default 4; De et al. 2022): K views per example, K times the compute per step
#                 (public steps too)
# MAX_SWITCH=N runs the automatic parts with mixing.auto.max_switch_step = N (default: 200, half
# the steps) as a sweep axis, so that their runs sit beside those with the default cap.
# at ε = 1, 3, 8 (EPSILONS=8: one of them), seeds 0, 1, 2 (SEEDS); SWITCHES=0,50 other switch steps.
# with R in A, B, C (experiments/bu2024_cifar.py); MODEL=vit for the CIFAR ViT (default wrn), whose
# sweeps go to OUTDIR/PART_vit (e.g. B_switch_vit), beside the WRN's.
# CONCURRENT=1 runs the PARTs at once (PARALLEL runs each; each run gets 0.9/(PARALLEL x parts) of
# the GPU memory) instead of one after another.
# On the GPU machine (device tool) run it after `source launch/device_env.sh`.
set -euo pipefail
out=$1; shift
source "$(dirname "$0")/gpu_sweeps.sh"  # sweep, run_parts, SEEDS, PARALLEL, CONCURRENT
model=${MODEL:-wrn}
eps=${EPSILONS:-1,3,8}
config() { echo "--config=experiments/bu2024_cifar.py:$1,$2,$model"; }
# The held-out criteria's checks need no curvature terms: no curvature records (the efficiency
# runs, R_auto, keep them for the decelerator and tr(H)).
held_out_only="--set=curvature.every_steps=0"
auto_sweep="--sweep=dp.target_epsilon=$eps${MAX_SWITCH:+ --sweep=mixing.auto.max_switch_step=$MAX_SWITCH}"
run_part() {  # run_part PART
  local part=$1 name=$1  # the sweep's folder: PART for the WRN, PART_MODEL for another model
  [[ $model == wrn ]] || name+="_$model"
  regime=${part%%_*}
  case ${part#*_} in
    baselines)
      sweep "$name" "$(config public_only "$regime")" \
          "$(config nonprivate "$regime")" "$(config clip_only "$regime")" ;;
    switch)
      sweep "$name" "$(config dp "$regime")" --sweep=mixing.switch_step=${SWITCHES:-0,50,100,200} \
          --sweep=dp.target_epsilon=$eps --x=mixing.switch_step --group=dp.target_epsilon ;;
    augmult)
      sweep "$name" "$(config dp "$regime")" --sweep=mixing.switch_step=${SWITCHES:-0,200} \
          --sweep=dp.target_epsilon=$eps --sweep=dp.augmult=${AUGMULTS:-4} \
          --x=mixing.switch_step --group=dp.target_epsilon ;;
    auto)
      sweep "$name" "$(config auto "$regime")" $auto_sweep ;;
    autowindow)
      sweep "$name" "$(config auto "$regime")" $auto_sweep \
          --set=mixing.auto.generalisation_checks=3 ;;
    plateau)
      sweep "$name" "$(config auto "$regime")" $auto_sweep \
          --set=mixing.auto.criterion=plateau --set=mixing.auto.plateau_metric=loss \
          $held_out_only ;;
    accplateau)
      sweep "$name" "$(config auto "$regime")" $auto_sweep \
          --set=mixing.auto.criterion=plateau --set=mixing.auto.plateau_metric=accuracy \
          $held_out_only ;;
    relplateau)
      sweep "$name" "$(config auto "$regime")" $auto_sweep \
          --set=mixing.auto.criterion=plateau --set=mixing.auto.plateau_metric=loss \
          --set=mixing.auto.patience=2 --set=mixing.auto.min_rel_delta=0.05 $held_out_only ;;
    lookahead)
      sweep "$name" "$(config auto "$regime")" $auto_sweep \
          --set=mixing.auto.criterion=lookahead \
          --set=mixing.auto.lookahead_steps=20 $held_out_only ;;  # past the 20-step warm-up
    *) echo "unknown part $part" >&2; return 2 ;;
  esac
}
run_parts run_part "$@"
