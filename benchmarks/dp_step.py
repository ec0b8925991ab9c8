"""Times one DP-SGD step (vmap per-example grads + clip + noise + update) against a plain step.

Each (model, mode) runs in its own subprocess so that peak memory is measured per configuration.
Prints a table and writes JSON: two `benchmarks.schema.Row`s per model (nondp, dp).

  python -m benchmarks.dp_step --out /tmp/dp_step.json                               # CPU, small
  python -m benchmarks.dp_step --batch 1024 --microbatch 256 --steps 20 --out ...    # GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Mapping, Sequence

from benchmarks import rows as rows_lib
from benchmarks import schema

MODELS = {
    "cnn_tanh_mnist": dict(name="cnn_tanh", input_shape=(28, 28, 1)),
    "vit_mini_32": dict(name="vit", variant="Ti", patch_size=4, image_size=32, depth=4,
                        input_shape=(32, 32, 3)),
}


def run_one(model_key: str, mode: str, batch: int, microbatch: int, steps: int) -> dict:
  """Times `steps` steps of one configuration in this process; returns the measurements."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from dpjax import models
  from dpjax.privacy import clipping, noise

  spec = dict(MODELS[model_key])
  shape = tuple(spec.pop("input_shape"))
  model = models.build_model(spec.pop("name"), num_classes=10, input_shape=shape, **spec)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))["params"]
  rng = np.random.default_rng(0)
  data = dict(image=jnp.asarray(rng.standard_normal((batch,) + shape), jnp.float32),
              label=jnp.asarray(rng.integers(0, 10, batch), jnp.int32))
  mask = jnp.ones(batch, bool)

  def example_loss(p, ex):
    logits = model.apply({"params": p}, ex["image"][None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["label"][None])[0]

  if mode == "dp":
    rule = clipping.FlatClip(1.0)
    opt = noise.dp_optimizer(optax.sgd(0.1), noise_multiplier=1.0, sensitivity=1.0,
                             expected_batch_size=float(batch))
    def grads_of(p, d):
      return clipping.clipped_grad_sum(example_loss, p, d, mask, rule,
                                       microbatch_size=microbatch).grad_sum
  else:
    opt = optax.sgd(0.1)
    def grads_of(p, d):
      batch_loss = lambda q: jnp.mean(jax.vmap(lambda ex: example_loss(q, ex))(d))
      return jax.grad(batch_loss)(p)

  @jax.jit
  def step(p, s, d):
    updates, s = opt.update(grads_of(p, d), s, p)
    return optax.apply_updates(p, updates), s

  state = opt.init(params)
  compile_start = time.perf_counter()
  params, state = step(params, state, data)
  jax.block_until_ready(params)
  compile_s = time.perf_counter() - compile_start
  start = time.perf_counter()
  for _ in range(steps):
    params, state = step(params, state, data)
  jax.block_until_ready(params)
  elapsed = time.perf_counter() - start
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  if peak is None:  # CPU: the process's peak resident memory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(model=model_key, mode=mode, batch=batch, microbatch=microbatch, steps=steps,
              examples_per_s=batch * steps / elapsed, step_ms=1e3 * elapsed / steps,
              compile_s=compile_s, peak_memory_bytes=int(peak), device=device.device_kind,
              platform=device.platform, jax=jax.__version__,
              num_params=sum(x.size for x in jax.tree_util.tree_leaves(params)))


DETAILS = ("step_ms", "steps", "num_params", "jax", "platform")


def to_rows(raw: Mapping, *, run: int, sources: tuple[str, str], command: str,
            commit: str | None, date: str | None, variant: Sequence[str] = (),
            details: Mapping | None = None) -> list[schema.Row]:
  """The nondp and dp `schema.Row`s of one model's measurement, raw = {"non_dp": run_one's
  dict, "dp": run_one's dict}: per-example vmap, flat clipping, float32, plain SGD; each mode's
  peak is its own process's. Arguments as `throughput.to_rows`."""
  non_dp, dp = raw["non_dp"], raw["dp"]
  if dp["batch"] % dp["microbatch"]:
    raise ValueError(f"batch {dp['batch']} is not a multiple of microbatch {dp['microbatch']}.")

  def mode(measured: Mapping, source: str) -> dict:
    return dict(examples_per_s=measured["examples_per_s"], compile_s=measured["compile_s"],
                peak_memory_bytes=measured["peak_memory_bytes"], source=source,
                details={k: measured[k] for k in DETAILS if k in measured} | dict(details or {}))
  shared = dict(benchmark="dp_step", model=dp["model"], dtype="float32", mesh="1x1",
                device=dp["device"], commit=commit, date=date,
                variant="; ".join(variant) or None, command=command, run=run)
  return schema.pair_rows(shared, dict(mode(non_dp, sources[0]), microbatch=non_dp["batch"]),
                          dict(mode(dp, sources[1]), microbatch=dp["microbatch"],
                               microbatches=dp["batch"] // dp["microbatch"], method="vmap",
                               clip="flat"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--microbatch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--models", default=",".join(MODELS))
  rows_lib.add_output_flags(parser)
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # model:mode, internal
  args = parser.parse_args()
  if args.one:
    model_key, mode = args.one.split(":")
    print(json.dumps(run_one(model_key, mode, args.batch, args.microbatch, args.steps)))
    return
  measured, rows, failed = [], [], []
  found = schema.provenance(args.commit)
  for run, model_key in enumerate(args.models.split(",")):
    pair = {mode: rows_lib.run_row(
        "benchmarks.dp_step", ["--one", f"{model_key}:{mode}", f"--batch={args.batch}",
                               f"--microbatch={args.microbatch}", f"--steps={args.steps}"],
        dict(model=model_key, mode=mode)) for mode in ("non_dp", "dp")}
    if any("failed" in r for r in pair.values()):
      failed += [r for r in pair.values() if "failed" in r]
    else:
      measured += pair.values()
      sources = tuple(f"{args.out or '-'}#/rows/{len(rows) + i}" for i in range(2))
      rows += to_rows(pair, run=run, sources=sources, command=rows_lib.command(
          "benchmarks.dp_step"), variant=rows_lib.environment_variant(), **found)
    rows_lib.write_table(args.out, "benchmarks.dp_step", rows, failed)
  print_table(measured)


def print_table(rows: list[dict]) -> None:
  base = {r["model"]: r for r in rows if r["mode"] == "non_dp"}
  print(f"{'model':<16} {'mode':<7} {'batch':>6} {'examples/s':>12} {'DP/non-DP':>10} "
        f"{'step ms':>9} {'peak MiB':>9} device")
  for r in rows:
    ratio = r["examples_per_s"] / base[r["model"]]["examples_per_s"]
    print(f"{r['model']:<16} {r['mode']:<7} {r['batch']:>6} {r['examples_per_s']:>12.0f} "
          f"{ratio:>10.3f} {r['step_ms']:>9.2f} {r['peak_memory_bytes'] / 2**20:>9.0f} "
          f"{r['device']}")


if __name__ == "__main__":
  main()
