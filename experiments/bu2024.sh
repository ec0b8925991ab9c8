#!/usr/bin/env bash
# Runs the Bu et al. (2024) small-scale experiments (see experiments/results/bu2024/README.md).
# Usage: bash experiments/bu2024.sh OUTDIR PART...   with PART in
#   fmnist     Fashion-MNIST CNN: baselines, switch-point × ε sweep, automatic switch per ε
#   mnist      MNIST CNN: baselines, switch at 0 / 300, automatic switch (ε = 3)
#   cross      public MNIST → private Fashion-MNIST: baselines, switch at 0 / 300, automatic
#   vit        Fashion-MNIST small ViT: public-only, switch at 0 / 300, automatic (ε = 3)
#   plateau    the automatic switch on the held-out public loss alone (criterion=plateau), ε = 3
#   public1pct Fashion-MNIST CNN with only 1% public data: public-only, switch sweep, ε = 3
# On the GPU machine (device tool) run it after `source launch/device_env.sh`.
set -euo pipefail
out=$1; shift
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}"
py=${PYTHON:-python3}
run() {  # run NAME CONFIG_ARG [--config.x=y ...]
  local name=$1 arg=$2; shift 2
  [ -f "$out/$name/results.json" ] || $py -m dpjax.main --config="experiments/continual.py:$arg" \
      --workdir="$out/$name" --progress=false "$@" > "$out/$name.log" 2>&1 || { tail -5 "$out/$name.log"; return 1; }
  grep "test accuracy" "$out/$name.log" | tail -1 | sed "s/^/$name: /"
}
sweep() {  # sweep NAME CONFIG_ARG SWEEP... (launch/sweep.py writes results.csv and plots)
  local name=$1 arg=$2; shift 2
  $py launch/sweep.py --config="experiments/continual.py:$arg" --workdir="$out/$name" --capture "$@" \
      | tail -20 || echo "(sweep report failed: re-collect with --collect_only where matplotlib is installed)"
}
baselines() {  # baselines PREFIX DATA MODEL
  run "$1_public_only" "public_only,$2,$3"
  run "$1_nonprivate" "nonprivate,$2,$3"
}
mkdir -p "$out"
for part in "$@"; do
  case $part in
    fmnist)
      baselines fmnist fashion_mnist cnn
      run fmnist_clip_only_switch300 clip_only,fashion_mnist,cnn
      run fmnist_clip_only_private_only clip_only,fashion_mnist,cnn \
          --config.mixing.schedule=constant --config.mixing.alpha=0.0 --config.mixing.switch_step=0
      sweep fmnist_switch dp,fashion_mnist,cnn --sweep=mixing.switch_step=0,100,200,300,400 \
          --sweep=dp.target_epsilon=1,3,8 --baseline=public_only="$out/fmnist_public_only" \
          --baseline=nonprivate="$out/fmnist_nonprivate"
      sweep fmnist_auto auto,fashion_mnist,cnn --sweep=dp.target_epsilon=1,3,8 ;;
    mnist)
      baselines mnist mnist cnn
      sweep mnist_switch dp,mnist,cnn --sweep=mixing.switch_step=0,300 \
          --baseline=public_only="$out/mnist_public_only" --baseline=nonprivate="$out/mnist_nonprivate"
      run mnist_auto auto,mnist,cnn ;;
    cross)
      run cross_public_only public_only,mnist_to_fashion_mnist,cnn
      sweep cross_switch dp,mnist_to_fashion_mnist,cnn --sweep=mixing.switch_step=0,300 \
          --baseline=public_only="$out/cross_public_only"
      run cross_auto auto,mnist_to_fashion_mnist,cnn ;;
    vit)
      run vit_public_only public_only,fashion_mnist,vit
      sweep vit_switch dp,fashion_mnist,vit --sweep=mixing.switch_step=0,300 \
          --baseline=public_only="$out/vit_public_only"
      run vit_auto auto,fashion_mnist,vit ;;
    plateau)
      for data in fashion_mnist mnist_to_fashion_mnist; do
        run "plateau_$data" "auto,$data,cnn" --config.mixing.auto.criterion=plateau \
            --config.mixing.auto.plateau_metric=loss
      done ;;
    public1pct)
      run public1pct_public_only public_only,fashion_mnist,cnn --config.data.public_fraction=0.01
      sweep public1pct_switch dp,fashion_mnist,cnn --sweep=mixing.switch_step=0,100,200,300,400 \
          --set=data.public_fraction=0.01 --baseline=public_only="$out/public1pct_public_only" ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
