"""DP-step throughput on a device mesh: 1 vs N devices, replicated vs FSDP params.

Each layout runs in its own subprocess (so peak memory is per layout) and times the trainer's own
jitted steps (`dpjax.train.step` under a `dpjax.parallel.Layout`):
  DP step     = k private microbatches (`accumulate`: per-example grads, clipping, on every device
                its own rows) + `total` (one all-reduce) + `apply` (noise once, AdamW update);
  non-DP step = `public_grad` on the same k·m examples + `apply`.
Weak scaling: every device gets `--per_device` examples per microbatch, so the global batch grows
with the devices; examples/s of N devices ÷ examples/s of one is the scaling factor (ideal N).

  python benchmarks/scaling.py --out benchmarks/results/scaling_h200x2.json       # ViT-B/16, 224
  python benchmarks/scaling.py --model vit_test --per_device 2 --microbatches 2 \\
      --layouts 1x1,2x1,1x2 --steps 2                                            # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

MODELS = {
    "vit_b16_224": dict(name="vit", variant="B", patch_size=16, image_size=224),
    "vit_test": dict(name="vit", variant="Ti", patch_size=8, image_size=32, depth=2),
}


def run_one(args: argparse.Namespace, data: int, fsdp: int) -> dict:
  """Times one layout in this process; returns its measurements."""
  import jax
  import numpy as np
  import optax

  from dpjax import models, parallel
  from dpjax.privacy import clipping, noise
  from dpjax.train import step as step_lib

  spec = dict(MODELS[args.model])
  size = spec["image_size"]
  model = models.build_model(spec.pop("name"), num_classes=1000, **spec)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32))
  params = params["params"]
  mesh = parallel.make_mesh(data, fsdp)
  devices = parallel.mesh_size(mesh)
  microbatch = args.per_device * devices
  rule = clipping.FlatClip(1.0)
  tx = noise.add_gaussian_noise(1.0, rule.sensitivity, float(microbatch * args.microbatches))
  optimizer = optax.adamw(1e-4, weight_decay=0.05)
  opt_state = step_lib.OptState(tx.init(params), optimizer.init(params))
  layout = parallel.make_layout(mesh, params, opt_state)
  params, opt_state = parallel.place(params, mesh), parallel.place(opt_state, mesh)
  example_loss = step_lib.make_example_loss(model, args.dtype)
  accumulate = step_lib.make_accumulate(example_loss, rule, layout=layout)
  total = step_lib.make_total(layout)
  zero_sum = step_lib.make_zero_sum(rule, layout)
  public_grad = step_lib.make_public_grad(example_loss, layout)
  apply = step_lib.make_apply(tx, optimizer, layout)
  rng = np.random.default_rng(0)

  def rows(n):
    return parallel.global_batch(mesh, dict(
        image=rng.standard_normal((n, size, size, 3)).astype(np.float32),
        label=rng.integers(0, 1000, n).astype(np.int32)), n)

  microbatches = [rows(microbatch) for _ in range(args.microbatches)]
  mask = parallel.global_batch(mesh, np.ones(microbatch, bool), microbatch)
  public = rows(microbatch * args.microbatches)
  alpha = np.float32(0.0)

  def dp_step(params, opt_state):
    acc = zero_sum(params)
    for batch in microbatches:
      acc = accumulate(acc, params, batch, mask)
    return apply(params, opt_state, None, total(acc).grad_sum, alpha)

  def non_dp_step(params, opt_state):
    grad, _ = public_grad(params, public)
    return apply(params, opt_state, grad, None, np.float32(1.0))

  result = dict(model=args.model, data=data, fsdp=fsdp, devices=devices, dtype=args.dtype,
                per_device=args.per_device, microbatches=args.microbatches,
                batch=microbatch * args.microbatches)
  for name, step in [("non_dp", non_dp_step), ("dp", dp_step)]:
    for _ in range(args.warmup):
      params, opt_state = step(params, opt_state)
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(args.steps):
      params, opt_state = step(params, opt_state)
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start
    result[f"{name}_examples_per_s"] = result["batch"] * args.steps / elapsed
    result[f"{name}_step_ms"] = 1e3 * elapsed / args.steps
  if args.breakdown:  # each piece of the DP step alone, blocking after it
    acc = zero_sum(params)
    pieces = dict(
        accumulate=lambda: accumulate(acc, params, microbatches[0], mask),
        total=lambda: total(acc),
        apply=lambda: apply(params, opt_state, None, total(acc).grad_sum, alpha))
    for name, piece in pieces.items():
      jax.block_until_ready(piece())
      start = time.perf_counter()
      for _ in range(args.steps):
        jax.block_until_ready(piece())
      result[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / args.steps
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
  peak = (max(peaks) if None not in peaks
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: process RSS
  device = jax.devices()[0]
  result.update(peak_memory_per_device_mb=peak / 2**20, device=device.device_kind,
                platform=device.platform, jax=jax.__version__,
                num_params=int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
                leaves_split_over_fsdp=sum("fsdp" in spec for spec in jax.tree_util.tree_leaves(
                    layout.params, is_leaf=lambda x: isinstance(x, parallel.P))))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="vit_b16_224", choices=sorted(MODELS))
  parser.add_argument("--layouts", default="1x1,2x1,1x2",
                      help="comma-separated DATAxFSDP mesh shapes, e.g. 1x1,2x1,1x2")
  parser.add_argument("--per_device", type=int, default=32, help="examples per device per "
                      "microbatch")
  parser.add_argument("--microbatches", type=int, default=4, help="microbatches per DP step")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--breakdown", action="store_true",
                      help="also time accumulate (one microbatch), total and apply alone")
  parser.add_argument("--out", default="")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # DATAxFSDP, internal
  args = parser.parse_args()
  if args.one:
    data, fsdp = map(int, args.one.split("x"))
    print(json.dumps(run_one(args, data, fsdp)))
    return
  rows = []
  passthrough = [f"--{k}={v}" for k, v in vars(args).items()
                 if k not in ("out", "layouts", "one", "breakdown")]
  passthrough += ["--breakdown"] if args.breakdown else []
  for layout in args.layouts.split(","):
    done = subprocess.run([sys.executable, __file__, "--one", layout] + passthrough,
                          capture_output=True, text=True)
    if done.returncode:
      sys.stderr.write(done.stdout + done.stderr)
      raise SystemExit(f"layout {layout} failed")
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
  print_table(rows)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(rows=rows, command="python " + " ".join(sys.argv), host=platform.node()),
                f, indent=2)


def print_table(rows: list[dict]) -> None:
  one = next((r for r in rows if r["devices"] == 1 and r["fsdp"] == 1), None)
  print(f"{'mesh':<12} {'batch':>6} {'DP ex/s':>9} {'non-DP ex/s':>12} {'DP/non-DP':>10} "
        f"{'DP scaling':>11} {'peak MB/dev':>12} device")
  for r in rows:
    scaling = r["dp_examples_per_s"] / one["dp_examples_per_s"] if one else float("nan")
    print(f"{r['data']}x{r['fsdp']} ({r['devices']} dev){'':<1} {r['batch']:>6} "
          f"{r['dp_examples_per_s']:>9.1f} {r['non_dp_examples_per_s']:>12.1f} "
          f"{r['dp_examples_per_s'] / r['non_dp_examples_per_s']:>10.3f} {scaling:>11.3f} "
          f"{r['peak_memory_per_device_mb']:>12.0f} {r['device']}")
    if "accumulate_ms" in r:
      print(f"{'':<12} one microbatch {r['accumulate_ms']:.1f} ms, total {r['total_ms']:.1f} ms, "
            f"apply {r['apply_ms']:.1f} ms")


if __name__ == "__main__":
  main()
