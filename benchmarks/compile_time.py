"""Where the DP step's compile time goes: host time of tracing + lowering and of XLA's compile of
each jitted function of the DP and non-DP steps, per XLA_FLAGS variant, with the host trace
events of the DP `accumulate` and `apply` compiles summed by name.

Each variant runs in its own subprocess (XLA_FLAGS are read when the backend starts; no
persistent compilation cache): the trainer's functions (`benchmarks/harness.py`: zero_sum,
accumulate, apply; public_grad, apply) are lowered on abstract arguments and compiled
once, nothing runs (a function that is a dispatcher over jits, the sharded `apply`, is timed
by its first call on arguments made beforehand: compile plus one run). With `--events`, the
compiles of accumulate and of the DP apply run under `jax.profiler.trace` (without its Python
tracer) and their host-side events (XLA's passes, LLVM/PTX compilation, autotuning: whatever XLA
annotates) are summed by name; events nest and run on several threads, so the sums overlap.

  python -m benchmarks.compile_time --model vit_b16_224 --method ghost --events \\
      --variants "baseline=;no_triton_gemm=--xla_gpu_enable_triton_gemm=false" \\
      --out $OUT/compile.json
  python -m benchmarks.compile_time --quick --out /tmp/c.json      # CPU smoke run

Each compiled function's flops and bytes accessed (XLA's cost analysis) are recorded too, and
the DP gradient's (accumulate) over the non-DP gradient's (public_grad): the extra arithmetic and
memory traffic that the DP step's speed pays for. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

from benchmarks import rows as rows_lib

QUICK = dict(model="vit_test", method="ghost", microbatch=8, variants="baseline=")


def run_one(args: argparse.Namespace) -> dict:
  import jax
  import numpy as np

  from benchmarks import harness, profile
  from dpjax import parallel
  from dpjax.train import microbatch_size

  jax.config.update("jax_enable_compilation_cache", False)  # measure the compile, not a cache
  steps = harness.Steps(args.model, parallel.make_mesh(1, 1), args.microbatch, 1, args.dtype,
                        args.clip, None, args.method)
  params, opt_state = steps.state
  _, shape, _ = harness.MODELS[args.model]
  one = dict(image=np.zeros((1,) + shape, np.float32), label=np.zeros(1, np.int32))
  batch, mask = microbatch_size.abstract_rows((one, np.ones(1, bool)), args.microbatch,
                                              steps.layout.batch)
  acc = jax.eval_shape(steps.zero_sum, params)  # grad_sum: per-device partial sums
  grad = jax.eval_shape(steps.total, acc).grad_sum  # params-shaped
  public = microbatch_size.abstract_rows(one, args.microbatch, steps.layout.batch)
  # The jitted functions of the two steps (`harness.Steps.dp` / `.non_dp`), on abstract arguments.
  pieces = {"zero_sum": (steps.zero_sum, (params,)),
            "accumulate": (steps.accumulate, (acc, params, None, batch, mask, np.bool_(True))),
            "apply_dp": (steps.apply, (params, opt_state, None, acc.grad_sum, np.float32(0.0))),
            "public_grad": (steps.public_grad, (params, public)),
            "apply_non_dp": (steps.apply, (params, opt_state, grad, None, np.float32(1.0)))}
  result = dict(model=args.model, method=args.method, clip=args.clip, dtype=args.dtype,
                microbatch=args.microbatch, variant=args.variant,
                xla_flags=os.environ.get("XLA_FLAGS", ""), pieces={})
  traced = ("accumulate", "apply_dp")  # their compiles' host events, with --events
  for name, (jitted, pargs) in pieces.items():
    tracing = (jax.profiler.trace(f"{args.trace_dir}/{name}", create_perfetto_trace=True,
                                  profiler_options=_host_events_only())
               if args.trace_dir and name in traced else contextlib.nullcontext())
    if not hasattr(jitted, "lower"):  # a dispatcher over jits (the sharded apply): a first call
      concrete = jax.block_until_ready(_concrete(pargs))  # made before the clock starts
      start = time.perf_counter()
      with tracing:
        jax.block_until_ready(jitted(*concrete))
      result["pieces"][name] = dict(lower_s=0.0, compile_s=time.perf_counter() - start)
      continue
    start = time.perf_counter()
    lowered = jitted.lower(*pargs)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    with tracing:
      compiled = lowered.compile()
    result["pieces"][name] = dict(hlo_lines=lowered.as_text().count("\n"), lower_s=lower_s,
                                  compile_s=time.perf_counter() - start, **_cost(compiled))
  total = lambda names: sum(sum(result["pieces"][n][k] for k in ("lower_s", "compile_s"))
                            for n in names)
  result["dp_s"] = total(("zero_sum", "accumulate", "apply_dp"))  # zero_sum: the first step's
  result["non_dp_s"] = total(("public_grad", "apply_non_dp"))
  # The DP gradient's arithmetic and memory traffic against the non-DP gradient's, by XLA's cost
  # model of the compiled functions (per microbatch: the overhead DP ÷ non-DP speed pays).
  dp_grad, non_dp_grad = result["pieces"]["accumulate"], result["pieces"]["public_grad"]
  for key in ("flops", "bytes_accessed"):
    if dp_grad.get(key) and non_dp_grad.get(key):
      result[f"accumulate_over_public_grad_{key}"] = dp_grad[key] / non_dp_grad[key]
  if args.trace_dir:
    result["host_events"] = {name: profile.host_event_times(f"{args.trace_dir}/{name}", args.top)
                             for name in traced}
  result.update(harness.device_facts())
  return result


def _cost(compiled) -> dict:
  """XLA's cost analysis of a compiled function: flops and bytes accessed (none if absent)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  return {name: float(cost[key]) for name, key in (("flops", "flops"),
                                                   ("bytes_accessed", "bytes accessed"))
          if key in cost}


def _host_events_only():
  """Profiler options without the Python tracer: it records every Python call, and tracing the
  DP apply (thousands of calls) under it took ~4× as long as the compile it was timing."""
  import jax
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  return options


def _concrete(tree):
  """Fresh device arrays for a call: zeros for ShapeDtypeStructs, copies of arrays (a donating
  call may consume them)."""
  import jax
  import jax.numpy as jnp

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding)
    return jnp.copy(x) if isinstance(x, jax.Array) else x
  return jax.tree_util.tree_map(one, tree)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small ViT on CPU")
  parser.add_argument("--model", default="vit_b16_224")
  parser.add_argument("--method", default="ghost", help="per-example method: vmap or ghost")
  parser.add_argument("--clip", default="flat")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--microbatch", type=int, default=128)
  parser.add_argument("--variants", default="baseline=",
                      help="';'-separated name=XLA_FLAGS (added to the environment's)")
  parser.add_argument("--events", action="store_true",
                      help="trace the compile and sum its host events by name")
  parser.add_argument("--top", type=int, default=40, help="host events kept, largest first")
  parser.add_argument("--out", default="")
  parser.add_argument("--variant", default="", help=argparse.SUPPRESS)  # set in the subprocess
  parser.add_argument("--trace_dir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.variant:
    print(json.dumps(run_one(args)))
    return
  if args.quick:
    for name, value in QUICK.items():
      setattr(args, name, value)
  rows = []
  for variant in filter(None, args.variants.split(";")):
    name, _, flags = variant.partition("=")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    row_flags = [f"--variant={name}", f"--model={args.model}", f"--method={args.method}",
                 f"--clip={args.clip}", f"--dtype={args.dtype}",
                 f"--microbatch={args.microbatch}", f"--top={args.top}"]
    if args.events:
      row_flags.append(f"--trace_dir=/tmp/compile_trace/{name}")
    rows.append(rows_lib.run_row("benchmarks.compile_time", row_flags,
                                 dict(variant=name, xla_flags=flags), env))
    print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    rows_lib.write_rows(args.out, "benchmarks.compile_time", rows)
  print(markdown_table(rows))
  for row in rows:
    for piece, events in row.get("host_events", {}).items():
      for event in events[:15]:
        print(f"  {row['variant']} {piece}: {event['ms']:10.1f} ms  {event['calls']:6d} × "
              f"{event['name']}")


def markdown_table(rows: list[dict]) -> str:
  names = ("accumulate", "apply_dp", "public_grad", "apply_non_dp")
  lines = ["| model | per-example | microbatch | variant | "
           + " | ".join(f"{n} lower + compile s" for n in names)
           + " | DP step s | non-DP step s | accumulate ÷ public_grad flops, bytes |",
           "|---|---|---|---|" + "---|" * (len(names) + 3)]
  for r in rows:
    if "failed" in r:
      lines.append(f"| | | | {r['variant']} | failed: {r['failed'][-120:]} |"
                   + " |" * (len(names) + 2))
      continue
    times = [r["pieces"][n] for n in names]
    lines.append(f"| {r['model']} | {r['method']} | {r['microbatch']} | {r['variant']} | "
                 + " | ".join(f"{t['lower_s']:.1f} + {t['compile_s']:.1f}" for t in times)
                 + f" | {r['dp_s']:.1f} | {r['non_dp_s']:.1f} | "
                 + ", ".join(f"{r[f'accumulate_over_public_grad_{k}']:.3f}"
                             if f"accumulate_over_public_grad_{k}" in r else "-"
                             for k in ("flops", "bytes_accessed")) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
