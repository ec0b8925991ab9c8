# Shared by the GPU studies run as PARTs (experiments/bu2024_cifar.sh, contrastive_cifar.sh):
# source it after setting `out` (the sweeps' folder), `py` (the python) and `seeds` (e.g. 0,1,2),
# define run_part PART, then `run_parts PART...`.
#   sweep NAME SWEEP.py-FLAGS...   launch/sweep.py in $out/NAME, PARALLEL (default 4) runs at a
#                                  time, one run per seed; a failed sweep (or report) is named
#                                  and the next part still runs.
#   run_parts PART...              the parts one after another, or with CONCURRENT=1 all at once
#                                  (each run gets 0.9/(PARALLEL × parts) of the GPU memory).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}"
sweep() {
  local name=$1; shift
  $py launch/sweep.py --workdir="$out/$name" --parallel="${PARALLEL:-4}" --sweep="seed=$seeds" \
      "$@" | tail -30 || echo "(sweep $name failed, or its report did: see $out/$name/*.log)"
}
run_parts() {
  mkdir -p "$out"
  if [[ "${CONCURRENT:-0}" == 1 ]]; then
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(
        $py -c "print(f'{0.9 / (${PARALLEL:-4} * $#):.3f}')")}"
    local pids=() status=0 part pid
    for part in "$@"; do run_part "$part" > "$out/$part.sweep.log" 2>&1 & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    for part in "$@"; do cat "$out/$part.sweep.log"; done
    return $status
  fi
  for part in "$@"; do run_part "$part"; done
}
