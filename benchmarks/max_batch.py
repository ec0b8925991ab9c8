"""The largest DP microbatch that fits one device, against the largest non-private batch, by XLA's
memory estimate of the compiled steps (compiled on abstract arguments: nothing is allocated or
run).

For each model × per-example method: XLA's estimate (temp + arguments + outputs − aliased, per
device: `dpjax.train.microbatch_size.compiled_memory_bytes`) of the DP `accumulate` step at two
microbatch sizes, and of the non-private `public_grad` step at two batch sizes. Both steps' memory
is affine in the number of rows (params, optimizer-free gradients and accumulators are fixed;
activations grow with the rows), so each pair of points gives the largest size under
`fraction` × the device's memory limit; that size (rounded down to `--multiple`) is compiled again
to check it, stepping down until it fits. The same estimate chooses `perf.microbatch_size = 0`.

  python -m benchmarks.max_batch --models vit_b16_224 --methods ghost,vmap --out $OUT/max_batch.json
  python -m benchmarks.max_batch --quick --out /tmp/m.json     # CPU smoke run (a small limit)

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math

from benchmarks import rows as rows_lib

QUICK = dict(models="vit_test", methods="ghost,vmap", probes="8,16", limit_mb=256.0, multiple=4)


def affine_max(points: dict[int, int], budget: float, multiple: int) -> int:
  """The largest multiple of `multiple` whose bytes, on the line through the two (rows, bytes)
  points, stay within `budget` (0 if none)."""
  (m1, b1), (m2, b2) = sorted(points.items())
  per_row = (b2 - b1) / (m2 - m1)
  if per_row <= 0:
    raise ValueError(f"memory does not grow with the rows ({points}): no line to extrapolate.")
  rows = (budget - (b1 - per_row * m1)) / per_row
  return max(int(math.floor(rows / multiple)) * multiple, 0)


def run_one(args: argparse.Namespace) -> dict:
  import jax
  import numpy as np

  from benchmarks import harness
  from dpjax import parallel
  from dpjax.train import microbatch_size

  probes = sorted(int(v) for v in args.probes.split(","))
  mesh = parallel.make_mesh(1, 1)
  steps = harness.Steps(args.model, mesh, probes[0], 1, args.dtype, args.clip,
                        args.attention or None, args.per_example)
  params = steps.state[0]
  _, shape, _ = harness.MODELS[args.model]
  one = dict(image=np.zeros((1,) + shape, np.float32), label=np.zeros(1, np.int32))
  rows = lambda m, tree: microbatch_size.abstract_rows(tree, m, steps.layout.batch)
  acc = jax.eval_shape(steps.zero_sum, params)
  measures = {
      "dp": microbatch_size.measure_jitted(
          steps.accumulate,
          lambda m: (acc, params, None, *rows(m, (one, np.ones(1, bool))), np.bool_(True))),
      "non_dp": microbatch_size.measure_jitted(
          steps.public_grad, lambda m: (params, rows(m, one)))}
  stats = jax.devices()[0].memory_stats() or {}
  limit = (args.limit_mb * 2**20 if args.limit_mb
           else stats.get("bytes_limit") or microbatch_size.host_available_bytes())
  budget = args.fraction * limit
  result = dict(model=args.model, per_example=args.per_example, clip=args.clip, dtype=args.dtype,
                limit_mb=limit / 2**20, fraction=args.fraction)
  for name, measure in measures.items():
    points = {m: measure(m) for m in probes}
    size = affine_max(points, budget, args.multiple)
    while size > 0 and measure(size) > budget:  # the line was optimistic: step down
      size -= args.multiple
    result.update({f"{name}_mb_at": {m: b / 2**20 for m, b in points.items()},
                   f"{name}_max_rows": size,
                   f"{name}_mb_at_max": measure(size) / 2**20 if size else None})
  result["dp_over_non_dp"] = (result["dp_max_rows"] / result["non_dp_max_rows"]
                              if result["non_dp_max_rows"] else None)
  result.update(harness.device_facts())
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a small ViT on CPU, small limit")
  parser.add_argument("--models", default="vit_b16_224")
  parser.add_argument("--methods", default="ghost,vmap", help="per-example methods")
  parser.add_argument("--clip", default="flat")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--probes", default="64,128", help="the two sizes the line goes through")
  parser.add_argument("--fraction", type=float, default=0.9, help="of the memory limit")
  parser.add_argument("--limit_mb", type=float, default=0.0,
                      help="memory limit; default: the device's bytes_limit")
  parser.add_argument("--multiple", type=int, default=8, help="sizes are multiples of this")
  parser.add_argument("--out", default="")
  for name in ("model", "per_example", "attention"):  # one configuration, internal
    parser.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.model:
    print(json.dumps(run_one(args)))
    return
  if args.quick:
    for name, value in QUICK.items():
      setattr(args, name, value)
  rows = []
  shared = [f"--{k}={getattr(args, k)}" for k in ("clip", "dtype", "probes", "fraction",
                                                  "limit_mb", "multiple")]
  for model in args.models.split(","):
    for method in args.methods.split(","):
      rows.append(rows_lib.run_row(
          "benchmarks.max_batch", [f"--model={model}", f"--per_example={method}"] + shared,
          dict(model=model, per_example=method)))
      print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
      rows_lib.write_rows(args.out, "benchmarks.max_batch", rows)
  print(markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | per-example | limit MB × fraction | largest DP microbatch | largest non-DP "
           "batch | DP ÷ non-DP |", "|---|---|---|---|---|---|"]
  for r in rows:
    if "failed" in r:
      lines.append(f"| {r['model']} | {r['per_example']} | failed: {r['failed']} ||||")
      continue
    ratio = r["dp_over_non_dp"]
    lines.append(f"| {r['model']} | {r['per_example']} | {r['limit_mb']:,.0f} × "
                 f"{r['fraction']:g} | {r['dp_max_rows']} | {r['non_dp_max_rows']} | "
                 f"{'-' if ratio is None else f'{ratio:.3f}'} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
