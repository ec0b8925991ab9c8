#!/usr/bin/env bash
# Privacy-audit experiment (experiments/audit.py): the same CNN trained non-privately and with DP
# at each ε, each with SHADOWS shadow runs (other canary coin flips) for LiRA; then
# `python -m dpjax.audit` on every target run and the table.
#   experiments/audit.sh WORKDIR [VARIANTS] [SHADOWS] [EXTRA FLAGS...]
#   e.g. JOBS=9 experiments/audit.sh /tmp/audit "nonprivate eps1 eps8" 8
# JOBS training runs at a time (default 1; one GPU holds many of these small runs).
# Results: WORKDIR/<variant>/{results.json,audit/audit.json,audit/roc.png}, table on stdout.
set -euo pipefail
W=${1:?usage: experiments/audit.sh WORKDIR [VARIANTS] [SHADOWS] [EXTRA FLAGS...]}
VARIANTS=${2:-"nonprivate eps1 eps8"}
SHADOWS=${3:-8}
shift $(( $# < 3 ? $# : 3 ))
PY=${PYTHON:-python}
mkdir -p "$W"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # parallel runs share the GPU's memory
jobs=()
for v in $VARIANTS; do
  for i in $(seq 0 "$SHADOWS"); do
    dir="$W/$v"; [ "$i" = 0 ] || dir="$W/${v}_shadow$i"
    cmd="$PY -m dpjax.main --config=experiments/audit.py:$v,$i --workdir=$dir --noprogress $*"
    echo "$cmd" > "$dir.cmd"
    jobs+=("$cmd > $dir.log 2>&1")
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P "${JOBS:-1}" -I{} bash -c {}
pids=()
for v in $VARIANTS; do
  shadows=$(seq -s, -f "$W/${v}_shadow%g" 1 "$SHADOWS")
  cmd="$PY -m dpjax.audit --workdir=$W/$v ${shadows:+--shadow_workdirs=$shadows}"
  echo "$cmd" > "$W/$v.audit.cmd"
  $cmd > "$W/$v.audit.log" 2>&1 &
  pids+=("$!:$v")
done
failed=0
for p in "${pids[@]}"; do  # status 2: the audit exceeded the accountant's epsilon
  wait "${p%%:*}" || { echo "audit of ${p#*:} failed: see $W/${p#*:}.audit.log" >&2; failed=1; }
done
$PY experiments/audit_table.py "$W"
exit $failed
