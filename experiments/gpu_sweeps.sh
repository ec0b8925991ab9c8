# Shared by the GPU studies' scripts (experiments/bu2024_cifar.sh, experiments/finetune_cifar.sh):
# source it after setting `out` (the runs' folder). It defines
#   sweep NAME FLAGS...   one launch/sweep.py command in $out/NAME over seed=$SEEDS (default
#                         0,1,2), PARALLEL (default 4) runs at a time on one GPU; a failed sweep
#                         is reported and the script goes on; SWEEP_FLAGS=--print_commands
#                         writes each run's variant.json (with its command) and runs nothing;
#                         START_BEFORE=UNIX_TIME starts no run after it (launch/sweep.py
#                         --start_before), so a device call ends with finished runs only
#   run_parts FN PART...  `FN PART` for each PART, one after another, or all at once with
#                         CONCURRENT=1 (each run then gets 0.9/(PARALLEL x parts) of the GPU memory)
# On the GPU machine (device tool) run the scripts after `source launch/device_env.sh`.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}"
py=${PYTHON:-python3}
seeds=${SEEDS:-0,1,2}
sweep() {  # sweep NAME SWEEP.py-FLAGS...
  local name=$1; shift
  $py launch/sweep.py --workdir="$out/$name" --parallel="${PARALLEL:-4}" --sweep="seed=$seeds" \
      "$@" ${START_BEFORE:+--start_before=$START_BEFORE} ${SWEEP_FLAGS:-} | tail -30 || echo "(sweep $name failed, or its report did: see $out/$name/*.log)"
}
run_parts() {  # run_parts FN PART...
  local fn=$1; shift
  mkdir -p "$out"
  if [[ "${CONCURRENT:-0}" == 1 ]]; then
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(
        $py -c "print(f'{0.9 / (${PARALLEL:-4} * $#):.3f}')")}"
    local pids=() status=0 part pid
    for part in "$@"; do "$fn" "$part" > "$out/$part.sweep.log" 2>&1 & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    for part in "$@"; do cat "$out/$part.sweep.log"; done
    return $status
  fi
  for part in "$@"; do "$fn" "$part"; done
}
