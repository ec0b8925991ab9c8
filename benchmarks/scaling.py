"""DP-step throughput on a device mesh: 1 vs N devices, replicated vs FSDP params.

Each layout runs in its own subprocess (so peak memory is per layout) and times the trainer's own
jitted steps (`dpjax.train.step` under a `dpjax.parallel.Layout`):
  DP step     = k private microbatches (`accumulate`: per-example norms by ghost clipping, or
                per-example grads by vmap (`--method`), clipping, on every device its own
                rows) + `apply` (the partial sums' all-reduce, noise once, AdamW update);
  non-DP step = `public_grad` on the same k·m examples + `apply`.
Weak scaling: every device gets `--per_device` examples per microbatch, so the global batch grows
with the devices; examples/s of N devices ÷ examples/s of one is the scaling factor (ideal N).

  python -m benchmarks.scaling --out benchmarks/results/runs/NAME.json         # ViT-B/16, 224
  python -m benchmarks.scaling --model vit_test --per_device 2 --microbatches 2 \\
      --layouts 1x1,2x1,1x2 --steps 2 --windows 1                                # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Mapping, Sequence

from benchmarks import rows as rows_lib
from benchmarks import schema


def run_one(args: argparse.Namespace, data: int, fsdp: int) -> dict:
  """Times one layout in this process; returns its measurements."""
  import jax
  import numpy as np

  from benchmarks import harness
  from dpjax import parallel

  mesh = parallel.make_mesh(data, fsdp)
  devices = parallel.mesh_size(mesh)
  steps = harness.Steps(args.model, mesh, args.per_device * devices, args.microbatches,
                        args.dtype, method=args.method)
  result = dict(model=args.model, method=args.method, data=data, fsdp=fsdp, devices=devices,
                dtype=args.dtype, per_device=args.per_device, microbatches=args.microbatches,
                batch=steps.batch, num_params=steps.num_params)
  for name in ("non_dp", "dp"):  # the allocator's peak after each (peaks only grow)
    result.update(steps.measure(name, args.windows, args.steps),
                  **{f"{name}_peak_memory_bytes": harness.peak_memory_bytes(mesh)})
  if args.breakdown:  # each piece of the DP step alone, blocking after it
    params, opt_state = steps.state
    chain = [steps.zero_sum(params)]  # accumulate donates its acc: feed it its own output back

    def one_microbatch():
      chain[0] = steps.accumulate(chain[0], params, None, steps.microbatches[0], steps.mask,
                                  np.bool_(False))
      return chain[0]
    acc = steps.zero_sum(params)
    pieces = dict(accumulate=one_microbatch, total=lambda: steps.total(acc))
    for name, piece in pieces.items():
      jax.block_until_ready(piece())
      start = time.perf_counter()
      for _ in range(args.steps):
        jax.block_until_ready(piece())
      result[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / args.steps
  specs = jax.tree_util.tree_leaves(steps.layout.params,
                                    is_leaf=lambda x: isinstance(x, parallel.P))
  result.update(harness.device_facts(),
                leaves_split_over_fsdp=sum("fsdp" in spec for spec in specs))
  return result


SHARED_DETAILS = ("devices", "per_device", "num_params", "leaves_split_over_fsdp", "jax",
                  "platform")


def to_rows(raw: Mapping, *, run: int, sources: tuple[str, str], command: str,
            commit: str | None, date: str | None, variant: Sequence[str] = (),
            details: Mapping | None = None) -> list[schema.Row]:
  """The nondp and dp `schema.Row`s of one layout's measurement (`run_one`'s dict): its
  per-example method (`--method`; runs measured before it existed were vmap's), flat clipping
  (the harness's default); the microbatch is global (per device × devices). The peaks are the
  largest over the mesh's devices. Arguments as `throughput.to_rows`."""
  shared_details = {k: raw[k] for k in SHARED_DETAILS if k in raw} | dict(details or {})
  nondp = schema.mode_fields(raw, "non_dp", sources[0], shared_details)
  nondp.update(microbatch=raw["batch"])
  dp = schema.mode_fields(raw, "dp", sources[1], shared_details)
  dp["details"].update({k: raw[k] for k in ("accumulate_ms", "total_ms", "apply_ms") if k in raw})
  dp.update(microbatch=raw["per_device"] * raw["devices"], microbatches=raw["microbatches"],
            method=raw.get("method", "vmap"), clip="flat")
  shared = dict(benchmark="scaling", model=raw["model"], dtype=raw["dtype"],
                mesh=f"{raw['data']}x{raw['fsdp']}", device=raw["device"], commit=commit,
                date=date, variant="; ".join(variant) or None, command=command, run=run)
  rows = schema.pair_rows(shared, nondp, dp)
  if rows[1]["batch"] != raw["batch"]:
    raise ValueError(f"layout {shared['mesh']}: batch {raw['batch']} is not per_device × devices "
                     "× microbatches.")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="vit_b16_224")
  parser.add_argument("--layouts", default="1x1,2x1,1x2",
                      help="comma-separated DATAxFSDP mesh shapes, e.g. 1x1,2x1,1x2")
  parser.add_argument("--per_device", type=int, default=32, help="examples per device per "
                      "microbatch")
  parser.add_argument("--microbatches", type=int, default=4, help="microbatches per DP step")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--method", default="ghost", choices=("ghost", "vmap"),
                      help="per-example method of the DP step (the trainer's default: ghost)")
  parser.add_argument("--steps", type=int, default=5, help="steps per timing window")
  parser.add_argument("--windows", type=int, default=3, help="timing windows (median)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time accumulate (one microbatch) and total (the partial sums' "
                           "all-reduce, inside apply in the step) alone")
  rows_lib.add_output_flags(parser)
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # DATAxFSDP, internal
  args = parser.parse_args()
  if args.one:
    data, fsdp = map(int, args.one.split("x"))
    print(json.dumps(run_one(args, data, fsdp)))
    return
  measured, rows = [], []
  found = schema.provenance(args.commit)
  passthrough = [f"--{k}={v}" for k, v in vars(args).items()
                 if k not in ("out", "layouts", "one", "breakdown", "commit")]
  passthrough += ["--breakdown"] if args.breakdown else []
  for run, layout in enumerate(args.layouts.split(",")):
    measured.append(rows_lib.run_row("benchmarks.scaling", ["--one", layout] + passthrough,
                                     dict(layout=layout)))
    if "failed" in measured[-1]:
      raise SystemExit(f"layout {layout} failed: {measured[-1]['failed']}")
    sources = tuple(f"{args.out or '-'}#/rows/{len(rows) + i}" for i in range(2))
    rows += to_rows(measured[-1], run=run, sources=sources,
                    command=rows_lib.command("benchmarks.scaling"),
                    variant=rows_lib.environment_variant(), **found)
  print_table(measured)
  rows_lib.write_table(args.out, "benchmarks.scaling", rows, [])


def print_table(rows: list[dict]) -> None:
  one = next((r for r in rows if r["devices"] == 1 and r["fsdp"] == 1), None)
  print(f"{'mesh':<12} {'batch':>6} {'DP ex/s':>9} {'non-DP ex/s':>12} {'DP/non-DP':>10} "
        f"{'DP scaling':>11} {'peak MiB/dev':>12} device")
  for r in rows:
    scaling = r["dp_examples_per_s"] / one["dp_examples_per_s"] if one else float("nan")
    print(f"{r['data']}x{r['fsdp']} ({r['devices']} dev){'':<1} {r['batch']:>6} "
          f"{r['dp_examples_per_s']:>9.1f} {r['non_dp_examples_per_s']:>12.1f} "
          f"{r['dp_examples_per_s'] / r['non_dp_examples_per_s']:>10.3f} {scaling:>11.3f} "
          f"{r['dp_peak_memory_bytes'] / 2**20:>12.0f} {r['device']}")
    if "accumulate_ms" in r:
      print(f"{'':<12} one microbatch {r['accumulate_ms']:.1f} ms, total {r['total_ms']:.1f} ms")


if __name__ == "__main__":
  main()
