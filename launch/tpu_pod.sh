#!/usr/bin/env bash
# DP training on a Cloud TPU pod slice: the same command on every worker VM, one process each.
#
# Usage (from a machine with gcloud; the repository is copied to every worker first):
#   bash launch/tpu_pod.sh TPU_NAME ZONE experiments/continual.py:dp gs://bucket/runs/fmnist_dp \
#       [--config.dp.target_epsilon=8 ...]
# WORKDIR must be a directory every worker sees (a shared filesystem such as Filestore, or a
# gcsfuse mount): every process writes its part of the orbax checkpoints there. The workers run
# with DPJAX_DISTRIBUTED=1, so dpjax.parallel.initialize_distributed calls jax.distributed
# .initialize(), which reads the coordinator and process ids from the TPU metadata. The mesh spans
# every chip of the slice; metrics and results come from worker 0.
# Environment: PROJECT (gcloud project, optional), DATA_DIR_ON_WORKERS (default ~/data: MNIST /
# Fashion-MNIST files on every worker), JAX_TPU_PIP (default "jax[tpu]": installed next to dpjax;
# the CPU pins of constraints.txt are not used there).
set -euo pipefail
tpu="$1" zone="$2" config="$3" workdir="$4"
shift 4
project=(${PROJECT:+--project="$PROJECT"})
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project[@]}" --worker=all)

# 1. the code, to every worker (tracked files only)
archive="$(mktemp -d)/dpjax.tgz"
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$tpu":~/dpjax.tgz --zone="$zone" "${project[@]}" \
  --worker=all
# 2. install and run, the same command on every worker at once
overrides="$(printf ' %q' "$@")"
"${ssh[@]}" --command="set -e; mkdir -p ~/dpjax && tar xzf ~/dpjax.tgz -C ~/dpjax && cd ~/dpjax \
  && python3 -m pip install -q '${JAX_TPU_PIP:-jax[tpu]}' -e . \
  && DPJAX_DISTRIBUTED=1 DPJAX_DATA_DIR=${DATA_DIR_ON_WORKERS:-\$HOME/data} python3 -m dpjax.main \
  --config=$config --workdir=$workdir --progress=false$overrides"
