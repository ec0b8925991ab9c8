"""DP vs non-private throughput on one device: models × clip rules × per-example methods ×
dtypes × microbatch sizes.

Each configuration runs in its own subprocess (peak memory and compile time per configuration)
and times the trainer's own steps (`benchmarks/harness.py`): the DP step (per-example norms by
`vmap(grad)` or ghost clipping, clipping, noise once, AdamW) and the non-private step on the same
examples, in
the same process, so their ratio compares like with like. Examples/s is the median over windows
of steps dispatched without per-step synchronisation; compile time is the first step's extra.

  python -m benchmarks.throughput --out benchmarks/results/runs/NAME.json  # GPU suite
  python -m benchmarks.throughput --quick --out /tmp/t.json                  # CPU, ~1 min

Prints a markdown table and writes JSON: two `benchmarks.schema.Row`s per configuration (nondp,
dp), the command, the configurations that failed.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
from typing import Mapping, Sequence

from benchmarks import rows as rows_lib
from benchmarks import schema

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
                        args.clip, args.attention or None, args.per_example, bool(args.scan),
                        args.sparse or "none")
  result = dict(model=args.model, clip=args.clip, dtype=args.dtype, microbatch=args.microbatch,
                microbatches=args.microbatches, batch=steps.batch, attention=args.attention,
                scan=args.scan, per_example=args.per_example, num_params=steps.num_params,
                sparse=args.sparse or "none")
  if args.attention == "auto":  # which kernel "auto" took here
    from dpjax.models import vit
    result["attention_kernel"] = "cudnn" if vit.cudnn_attention_runs(args.dtype) else "xla"
  # Non-DP first: the allocator's peak after it is the non-DP step's; after the DP step, the
  # overall peak is the DP step's whenever that is the larger (peaks only grow).
  result.update(steps.measure("non_dp", args.windows, args.steps),
                non_dp_peak_memory_bytes=harness.peak_memory_bytes(mesh))
  result.update(steps.measure("dp", args.windows, args.steps),
                dp_peak_memory_bytes=harness.peak_memory_bytes(mesh))  # before the extras below
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
  result.update(harness.device_facts())
  return result


SHARED_DETAILS = ("num_params", "attention", "attention_kernel", "scan", "sparse", "jax",
                  "platform")


# When the ViT's default attention became "auto" (commit 6db1a9f); before it, "fused" was.
AUTO_ATTENTION_SINCE = datetime.datetime.fromisoformat("2026-12-04T16:19:25+00:00")


def _before_auto_attention(date: str | None) -> bool:
  """Whether a row of `date` (None: an archived row, all older) ran before "auto" was the
  default."""
  return date is None or datetime.datetime.fromisoformat(date) < AUTO_ATTENTION_SINCE


def to_rows(raw: Mapping, *, run: int, sources: tuple[str, str], command: str,
            commit: str | None, date: str | None, variant: Sequence[str] = (),
            details: Mapping | None = None) -> list[schema.Row]:
  """The nondp and dp `schema.Row`s of one configuration's measurement (`run_one`'s dict).

  `sources`: the two rows' `source`; `variant`: what else differs from a plain run (e.g. a smoke
  run's settings); scanned blocks, another attention than the default when it ran (`"auto"`;
  `"fused"` before `AUTO_ATTENTION_SINCE`) and a profile (its HLO dump slows the compiles) are
  read off `raw`. `details`: extra details for both rows.
  """
  parts = list(variant)
  if raw.get("scan"):
    parts.append("scan_blocks")
  if raw.get("sparse", "none") != "none":
    parts.append(f"sparse={raw['sparse']}")
  if raw.get("attention") not in (None, "", "auto") and not (
      raw["attention"] == "fused" and _before_auto_attention(date)):
    parts.append(f"attention={raw['attention']}")
  if "dp_profile" in raw:
    parts.append("profiled")
  shared_details = {k: raw[k] for k in SHARED_DETAILS if k in raw} | dict(details or {})
  nondp = schema.mode_fields(raw, "non_dp", sources[0], shared_details, ("profile",))
  nondp.update(microbatch=raw["batch"])
  dp = schema.mode_fields(raw, "dp", sources[1], shared_details, ("profile",))
  if raw.get("pieces"):
    dp["details"]["pieces"] = raw["pieces"]
  dp.update(microbatch=raw["microbatch"], microbatches=raw["microbatches"],
            method=raw["per_example"], clip=raw["clip"])
  shared = dict(benchmark="throughput", model=raw["model"], dtype=raw["dtype"], mesh="1x1",
                device=raw["device"], commit=commit, date=date, variant="; ".join(parts) or None,
                command=command, run=run)
  return schema.pair_rows(shared, nondp, dp)


def configurations(args: argparse.Namespace) -> list[dict]:
  suite = QUICK if args.quick else SUITE
  if args.shapes:  # model:MICROBATCHxK,...
    suite = [(s.split(":")[0],) + tuple(int(v) for v in s.split(":")[1].split("x"))
             for s in args.shapes.split(",")]
  if args.models:
    suite = [c for c in suite if c[0] in args.models.split(",")]
  rows = []
  for (model, microbatch, k), clip, dtype, method, sparse in itertools.product(
      suite, args.clips.split(","), args.dtypes.split(","), args.methods.split(","),
      args.sparse.split(",")):
    vit = model.startswith("vit")
    attentions = args.attentions.split(",") if vit else [""]
    scans = [int(v) for v in args.scans.split(",")] if vit else [0]
    rows += [dict(model=model, microbatch=microbatch, microbatches=k, clip=clip, dtype=dtype,
                  attention=a, scan=scan, per_example=method, sparse=sparse)
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
  parser.add_argument("--attentions", default="auto",
                      help="ViT attention: auto (the default: cuDNN's where it runs, else XLA's), "
                           "fused, einsum, cudnn (GPU)")
  parser.add_argument("--methods", default="vmap",
                      help="per-example method: vmap,ghost")
  parser.add_argument("--scans", default="0",
                      help="ViT blocks: 0 (one per layer), 1 (nn.scan), or 0,1 for both")
  parser.add_argument("--sparse", default="none",
                      help="DP step under a sparse fine-tuning mask (20%% of each kernel's output "
                           "rows): none, rows (kept factored, as the trainer does), instantiated "
                           "(per-example gradients of the masked kernels formed), comma-separated")
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
  rows_lib.add_output_flags(parser)
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
  measured, rows, failed = [], [], []
  found = schema.provenance(args.commit)
  variant = (["quick"] if args.quick else []) + rows_lib.environment_variant()
  for run, config in enumerate(configurations(args)):
    flags = [f"--{k}={v}" for k, v in config.items()] + [
        f"--steps={args.steps}", f"--windows={args.windows}"] + (
        ["--breakdown"] if args.breakdown else []) + (
        [f"--profile={args.profile}/{run}", f"--profile_top={args.profile_top}"]
        if args.profile else [])
    env = dict(os.environ)
    if args.profile:  # the optimized HLO, to name what each kernel computes
      from benchmarks import profile
      env["XLA_FLAGS"] = profile.dump_flags(f"{args.profile}/{run}/hlo")
    raw = rows_lib.run_row("benchmarks.throughput", flags, config, env)
    measured.append(raw)
    if "failed" in raw:
      failed.append(raw)
    else:
      print(markdown_table([raw]).splitlines()[-1], flush=True)
      sources = tuple(f"{args.out or '-'}#/rows/{len(rows) + i}" for i in range(2))
      rows += to_rows(raw, run=run, sources=sources, command=rows_lib.command(
          "benchmarks.throughput"), variant=variant, **found)
    rows_lib.write_table(args.out, "benchmarks.throughput", rows, failed)
  print(markdown_table(measured))


def markdown_table(rows: list[dict]) -> str:
  lines = ["| model | clip | per-example | dtype | attention | scan | microbatch × k | "
           "non-DP ex/s | DP ex/s | DP ÷ non-DP | DP compile s | non-DP peak MiB | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    method = r['per_example'] + (f" (sparse={r['sparse']})"
                                 if r.get("sparse", "none") != "none" else "")
    head = (f"| {r['model']} | {r['clip']} | {method} | {r['dtype']} | "
            f"{r.get('attention') or '-'} | {'yes' if r.get('scan') else 'no'} | "
            f"{r['microbatch']} × {r['microbatches']} |")
    if "failed" in r:
      lines.append(head + f" failed: {r['failed']} ||||||")
      continue
    lines.append(head + f" {r['non_dp_examples_per_s']:,.0f} | {r['dp_examples_per_s']:,.0f} | "
                 f"{r['dp_over_non_dp']:.3f} | {r['dp_compile_s']:.1f} | "
                 f"{r['non_dp_peak_memory_bytes'] / 2**20:,.0f} | "
                 f"{r['dp_peak_memory_bytes'] / 2**20:,.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
