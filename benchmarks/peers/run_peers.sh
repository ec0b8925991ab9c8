#!/usr/bin/env bash
# dpjax and its peers on one GPU in one device call (each part in its own processes, one after
# the other, writing benchmarks.schema rows under $OUT), then one table of all rows side by side:
#   1. dpjax: benchmarks.throughput, ViT-B/16 ghost, flat clipping, bf16, batch 128 (its DP step
#      and its non-private step);
#   2. jax_privacy 2.x clipped_grad on dpjax's Flax ViT-B/16, bf16, batch 128
#      (benchmarks.peers.jax_privacy_vit; and a plain JAX/optax step); again with clipped_grad's
#      microbatch_size=32 only if batch 128 wrote no DP row (out of memory);
#   3. Opacus 1.6 ghost clipping on timm's ViT-B/16 made ready for Opacus, bf16 autocast, over a
#      batch search (benchmarks.peers.opacus_vit; and timm's non-private step at each batch);
#   4. Opacus ghost on timm's ViT-B/16 as timm builds it (its torch.func fallback), one batch.
#
# Run from the repository root on the GPU machine of the device tool, carrying .whl (dpjax's
# wheels, launch/device_env.sh) and .whl_peers (opacus, jax_privacy):
#   COMMIT=<dpjax commit> bash benchmarks/peers/run_peers.sh
# Environment: COMMIT (recorded in the rows; the device's copy has no .git), OUT (default
# ./peers_out), BUDGET (seconds for everything, default 540), OPACUS_BATCHES (default
# 32,64,128,256,512), SMOKE=1 (tiny models and few steps: a CPU check of this script),
# WHEELS=0 (skip the installs: the packages are importable already), PY_JAX / PY_TORCH (the
# Python of each part, default python3).
set -u
cd "$(dirname "$0")/../.."
START=$SECONDS
BUDGET=${BUDGET:-540}
OUT=${OUT:-$PWD/peers_out}
COMMIT=${COMMIT:-}
PY_JAX=${PY_JAX:-python3}
PY_TORCH=${PY_TORCH:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/peers_log.txt") 2>&1
export PYTHONUNBUFFERED=1

if [ "${WHEELS:-1}" = 1 ]; then
  source launch/device_env.sh || { echo "dpjax's wheels (.whl) did not install"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/peers_site .whl_peers/*.whl || { echo "the peers' wheels did not install"; exit 1; }
  export PYTHONPATH="/tmp/site:/tmp/peers_site:$PWD"
  python3 -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|torch|timm|opacus|jax.privacy) "
fi

if [ "${SMOKE:-0}" = 1 ]; then
  DPJAX_SHAPE=vit_test:8x1; JP=(--model vit_test --batches 8 --steps 2 --windows 1); JP_MICROBATCH=4
  OPACUS=(--model vit_test --steps 2 --windows 1 --warmup 0); OPACUS_BATCHES=${OPACUS_BATCHES:-4,8}
  STOCK_BATCH=4; TIMING=(--steps 2 --windows 1)
else
  DPJAX_SHAPE=vit_b16_224:128x1; JP=(--batches 128); JP_MICROBATCH=32
  OPACUS=(); OPACUS_BATCHES=${OPACUS_BATCHES:-32,64,128,256,512}
  STOCK_BATCH=64; TIMING=(--steps 10 --windows 3)
fi

# Seconds a part may take: at most $1, and never past the budget less $2 kept for what follows.
cap() {
  local left=$((BUDGET - (SECONDS - START) - $2))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a timeout; reports how it ended
  local name=$1 limit=$2; shift 2
  if [ "$limit" -le 10 ]; then echo "== $name: skipped, the budget is spent"; return; fi
  echo "== $name (at most ${limit}s, $((SECONDS - START))s gone): $*"
  timeout "$limit" "$@"; local rc=$?
  [ $rc = 124 ] && echo "== $name: stopped at its ${limit}s limit (its finished rows are kept)"
  [ $rc != 0 ] && [ $rc != 124 ] && echo "== $name: exit status $rc"
}

part dpjax "$(cap 170 300)" "$PY_JAX" -m benchmarks.throughput --shapes "$DPJAX_SHAPE" \
  --methods ghost --clips flat --dtypes bfloat16 "${TIMING[@]}" --commit "$COMMIT" \
  --out "$OUT/dpjax.json"
# jax_privacy holds [batch, params] float32 per-example gradients (44 GB at 128): give JAX more
# of the GPU than its default 75% (the parts run one after the other), and if batch 128 still
# runs out of memory, time it with clipped_grad's own microbatching.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
part jax_privacy "$(cap 170 150)" "$PY_JAX" -m benchmarks.peers.jax_privacy_vit "${JP[@]}" \
  --commit "$COMMIT" --out "$OUT/jax_privacy.json"
if ! grep -qs '"mode": "dp"' "$OUT/jax_privacy.json"; then
  part jax_privacy_microbatched "$(cap 150 150)" "$PY_JAX" -m benchmarks.peers.jax_privacy_vit \
    "${JP[@]}" --microbatch_size "$JP_MICROBATCH" --commit "$COMMIT" \
    --out "$OUT/jax_privacy_microbatched.json"
fi
part opacus "$(cap 240 55)" "$PY_TORCH" -m benchmarks.peers.opacus_vit --modes ghost \
  --batches "$OPACUS_BATCHES" "${OPACUS[@]}" --commit "$COMMIT" --out "$OUT/opacus.json"
part opacus_stock "$(cap 45 10)" "$PY_TORCH" -m benchmarks.peers.opacus_vit --modes ghost \
  --layout stock --batches "$STOCK_BATCH" "${OPACUS[@]}" --commit "$COMMIT" \
  --out "$OUT/opacus_stock.json"

echo "== all rows ($((SECONDS - START))s gone)"
"$PY_JAX" -m benchmarks.peers.table "$OUT/dpjax.json" "$OUT/jax_privacy.json" \
  "$OUT/jax_privacy_microbatched.json" "$OUT/opacus.json" "$OUT/opacus_stock.json" \
  | tee "$OUT/table.md"
