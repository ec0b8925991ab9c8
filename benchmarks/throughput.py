"""DP vs non-private throughput on one device: models × clip rules × per-example methods ×
dtypes × microbatch sizes.

Each configuration runs in its own subprocess (peak memory and compile time per configuration)
and times the trainer's own steps (`benchmarks/harness.py`): the DP step (per-example norms by
`vmap(grad)` or ghost clipping, clipping, noise once, AdamW) and the non-private step on the same
examples, in
the same process, so their ratio compares like with like. Examples/s is the median over windows
of steps dispatched without per-step synchronisation; compile time is the first step's extra.

  python -m benchmarks.throughput --out benchmarks/results/throughput_h100.json      # GPU suite
  python -m benchmarks.throughput --quick --out /tmp/t.json                           # CPU, ~1 min

Prints a markdown table and writes JSON (rows, command, versions).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

from benchmarks import rows as rows_lib

# (model, microbatch, microbatches per step); the GPU suite and the CPU smoke run.
SUITE = [("vit_b16_224", 32, 4), ("vit_b16_224", 64, 2), ("vit_b16_224", 128, 1),
         ("vit_s16_224", 128, 2), ("vit_cifar", 256, 1), ("wrn_16_4", 256, 1),
         ("cnn_tanh", 1024, 1)]
QUICK = [("cnn_tanh", 32, 2), ("vit_test", 8, 2)]


def run_one(args: argparse.Namespace) -> dict:
  import jax

  from benchmarks import harness
  from dpjax import parallel

  mesh = parallel.make_mesh(1, 1)
  steps = harness.Steps(args.model, mesh, args.microbatch, args.microbatches, args.dtype,
                        args.clip, args.attention or None, args.per_example, bool(args.scan))
  result = dict(model=args.model, clip=args.clip, dtype=args.dtype, microbatch=args.microbatch,
                microbatches=args.microbatches, batch=steps.batch, attention=args.attention,
                scan=args.scan, per_example=args.per_example, num_params=steps.num_params)
  # Non-DP first: the allocator's peak after it is the non-DP step's; after the DP step, the
  # overall peak is the DP step's whenever that is the larger (peaks only grow).
  result.update(steps.measure("non_dp", args.windows, args.steps),
                non_dp_peak_memory_mb=harness.peak_memory_mb(mesh))
  result.update(steps.measure("dp", args.windows, args.steps))
  result["dp_over_non_dp"] = result["dp_examples_per_s"] / result["non_dp_examples_per_s"]
  if args.breakdown:
    result["pieces"] = steps.time_pieces(args.steps)
  if args.profile:
    from benchmarks import profile
    for name in ("non_dp", "dp"):
      def run(step=getattr(steps, name)):
        for _ in range(3):
          steps.state = step(*steps.state)
        jax.block_until_ready(steps.state)
      try:
        found = profile.kernel_times(run, f"{args.profile}/{name}", args.profile_top)
        profile.annotate(found["kernels"], f"{args.profile}/hlo")
        result[f"{name}_profile"] = found
      except Exception as e:  # a trace that cannot be written or read loses no measurement
        result[f"{name}_profile"] = dict(error=repr(e)[:500])
  result.update(harness.device_facts(), peak_memory_mb=harness.peak_memory_mb(mesh))
  return result


def configurations(args: argparse.Namespace) -> list[dict]:
  suite = QUICK if args.quick else SUITE
  if args.shapes:  # model:MICROBATCHxK,...
    suite = [(s.split(":")[0],) + tuple(int(v) for v in s.split(":")[1].split("x"))
             for s in args.shapes.split(",")]
  if args.models:
    suite = [c for c in suite if c[0] in args.models.split(",")]
  rows = []
  for (model, microbatch, k), clip, dtype, method in itertools.product(
      suite, args.clips.split(","), args.dtypes.split(","), args.methods.split(",")):
    vit = model.startswith("vit")
    attentions = args.attentions.split(",") if vit else [""]
    scans = [int(v) for v in args.scans.split(",")] if vit else [0]
    rows += [dict(model=model, microbatch=microbatch, microbatches=k, clip=clip, dtype=dtype,
                  attention=a, scan=scan, per_example=method)
             for a, scan in itertools.product(attentions, scans)]
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small models on CPU, few steps")
  parser.add_argument("--models", default="", help="comma-separated subset of the suite")
  parser.add_argument("--shapes", default="",
                      help="replaces the suite: model:MICROBATCHxK,... e.g. vit_b16_224:64x2")
  parser.add_argument("--clips", default="flat", help="comma-separated: flat,automatic,per_layer")
  parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float32")
  parser.add_argument("--attentions", default="fused", help="ViT attention: fused,einsum")
  parser.add_argument("--methods", default="vmap",
                      help="per-example method: vmap,ghost")
  parser.add_argument("--scans", default="0",
                      help="ViT blocks: 0 (one per layer), 1 (nn.scan), or 0,1 for both")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time the non-DP gradient, the DP accumulate and ghost's norms "
                           "alone on one microbatch")
  parser.add_argument("--profile", default="",
                      help="folder for profiler traces: adds each step's device time per kernel "
                           "(3 steps) to the JSON rows")
  parser.add_argument("--profile_top", type=int, default=40,
                      help="kernels kept per profiled step (largest first)")
  parser.add_argument("--steps", type=int, default=10, help="steps per timing window")
  parser.add_argument("--windows", type=int, default=3, help="timing windows (median)")
  parser.add_argument("--out", default="")
  # one configuration, internal
  for name in ("model", "clip", "dtype", "attention", "per_example"):
    parser.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
  for name in ("microbatch", "microbatches", "scan"):
    parser.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.model:
    print(json.dumps(run_one(args)))
    return
  if args.quick:
    args.steps, args.windows = min(args.steps, 2), min(args.windows, 2)
  rows = []
  for config in configurations(args):
    flags = [f"--{k}={v}" for k, v in config.items()] + [
        f"--steps={args.steps}", f"--windows={args.windows}"] + (
        ["--breakdown"] if args.breakdown else []) + (
        [f"--profile={args.profile}/{len(rows)}", f"--profile_top={args.profile_top}"]
        if args.profile else [])
    env = dict(os.environ)
    if args.profile:  # the optimized HLO, to name what each kernel computes
      from benchmarks import profile
      env["XLA_FLAGS"] = profile.dump_flags(f"{args.profile}/{len(rows)}/hlo")
    rows.append(rows_lib.run_row("benchmarks.throughput", flags, config, env))
    if "failed" not in rows[-1]:
      print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    rows_lib.write_rows(args.out, "benchmarks.throughput", rows)
  print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | clip | per-example | dtype | attention | scan | microbatch × k | "
           "non-DP ex/s | DP ex/s | DP ÷ non-DP | DP compile s | non-DP peak MB | peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    head = (f"| {r['model']} | {r['clip']} | {r['per_example']} | {r['dtype']} | "
            f"{r.get('attention') or '-'} | {'yes' if r.get('scan') else 'no'} | "
            f"{r['microbatch']} × {r['microbatches']} |")
    if "failed" in r:
      lines.append(head + f" failed: {r['failed']} ||||||")
      continue
    lines.append(head + f" {r['non_dp_examples_per_s']:,.0f} | {r['dp_examples_per_s']:,.0f} | "
                 f"{r['dp_over_non_dp']:.3f} | {r['dp_compile_s']:.1f} | "
                 f"{r.get('non_dp_peak_memory_mb', float('nan')):,.0f} | "
                 f"{r['peak_memory_mb']:,.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
