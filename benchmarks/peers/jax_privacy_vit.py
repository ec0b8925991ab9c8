"""jax_privacy's `clipped_grad` DP step against a plain JAX step on dpjax's own Flax ViT, in
dpjax's row format.

Per batch size, in its own process, on random data (the same batch every step), both steps on
the model of `benchmarks.harness.MODELS` (default vit_b16_224: dpjax's Flax ViT-B/16, 224×224,
1000 classes, float32 params) and its per-example loss (`dpjax.train.step.make_example_loss`:
computed in --dtype, bfloat16 as dpjax's throughput row), with `optax.adamw(1e-4,
weight_decay=0.05)` as `harness.Steps`:
  non-DP step = `jax.value_and_grad` of the batch's mean loss (one batched forward in --dtype),
                AdamW update: one jitted function;
  DP step     = `jax_privacy.clipped_grad(loss, l2_clip_norm=--clip_norm, batch_argnums=1,
                keep_batch_dim=False, normalize_by=batch, microbatch_size=--microbatch_size)`
                (per-example gradients by vmap, each clipped, summed, divided by the batch),
                `jax_privacy.noise_addition.gaussian_privatizer(stddev = --noise_multiplier ×
                the clipped function's l2_norm_bound)` (as jax_privacy's keras_api does), AdamW
                update: one jitted function. Its noise key is fresh OS entropy.
Timing: `benchmarks.harness.time_steps`, as dpjax's throughput rows (the first call's extra
seconds are the row's compile_s; --windows windows of --steps steps, one block each, median).
Peak memory: the device allocator's peak after each step (`harness.peak_memory_bytes`; the
non-DP step runs first, so the DP row's peak is the DP step's whenever that is the larger).

  python -m benchmarks.peers.jax_privacy_vit --batches 128 --out $OUT/jax_privacy.json
  python -m benchmarks.peers.jax_privacy_vit --model vit_test --batches 4 --steps 2 \\
      --windows 1 --dtype float32                                    # CPU smoke run

Needs jax_privacy 2.x (GPU: `benchmarks/peers/run_peers.sh` installs it from a carried wheel).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

from benchmarks.peers import search

BENCHMARK = "peers.jax_privacy_vit"


def run_one(args: argparse.Namespace) -> dict:
  """One batch size's raw measurement (`benchmarks.peers.search`): the plain step, then
  jax_privacy's DP step."""
  import jax
  import jax.numpy as jnp
  import jax_privacy
  import numpy as np
  import optax
  from jax_privacy import noise_addition

  from benchmarks import harness
  from dpjax import parallel
  from dpjax.privacy import randomness
  from dpjax.train import step as step_lib

  model, params, shape, classes = harness.build_model(args.model)
  example_loss = step_lib.make_example_loss(model, args.dtype)
  batch = jax.device_put(harness.random_rows(np.random.default_rng(0), shape, classes,
                                             args.batch))
  optimizer = optax.adamw(1e-4, weight_decay=0.05)
  compute = jnp.dtype(args.dtype)

  def mean_loss(params, batch):
    cast = jax.tree_util.tree_map(lambda p: p.astype(compute), params)
    logits = model.apply({"params": cast}, batch["image"].astype(compute))
    return jnp.mean(step_lib.cross_entropy(logits, batch["label"]))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def non_dp_step(params, opt_state, batch):
    _, grads = jax.value_and_grad(mean_loss)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  microbatch = args.microbatch_size or args.batch
  if args.batch % microbatch:
    raise ValueError(f"--microbatch_size {microbatch} must divide the batch {args.batch}.")
  clipped = jax_privacy.clipped_grad(
      example_loss, l2_clip_norm=args.clip_norm, batch_argnums=1, keep_batch_dim=False,
      normalize_by=args.batch, microbatch_size=args.microbatch_size or None)
  privatizer = noise_addition.gaussian_privatizer(
      stddev=args.noise_multiplier * clipped.l2_norm_bound,
      prng_key=jnp.asarray(randomness.fresh_noise_key()))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def dp_step(params, opt_state, noise_state, batch):
    noisy, noise_state = privatizer.update(clipped(params, batch), noise_state)
    updates, opt_state = optimizer.update(noisy, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, noise_state

  mesh = parallel.make_mesh(1, 1)
  num_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
  copy = lambda: jax.tree_util.tree_map(jnp.copy, params)  # each step donates its own
  state = {"non_dp": (copy(), optimizer.init(params)),
           "dp": (copy(), optimizer.init(params), privatizer.init(params))}
  steps = {"non_dp": non_dp_step, "dp": dp_step}

  def measure(name: str) -> dict:
    def advance():
      state[name] = steps[name](*state[name], batch)
      return state[name]
    host: list[float] = []
    first_s, step_s = harness.time_steps(advance, args.windows, args.steps, host)
    return {f"{name}_examples_per_s": args.batch / step_s, f"{name}_step_ms": 1e3 * step_s,
            f"{name}_dispatch_ms": 1e3 * statistics.median(host),
            f"{name}_compile_s": max(first_s - step_s, 0.0),
            f"{name}_peak_memory_bytes": harness.peak_memory_bytes(mesh)}

  facts = harness.device_facts()
  result = dict(model=args.model, dtype=args.dtype, batch=args.batch, microbatch=microbatch,
                microbatches=args.batch // microbatch, method="vmap", clip="flat",
                device=facts["device"])
  result.update(measure("non_dp"))
  state.pop("non_dp")
  result.update(measure("dp"))
  version = getattr(jax_privacy, "__version__", None) or _installed_version("jax-privacy")
  result["details"] = dict(
      framework=f"jax_privacy {version}, jax {jax.__version__}, optax {optax.__version__}",
      num_params=num_params,
      platform=facts["platform"], jax=facts["jax"], sampling="fixed batch",
      noise_multiplier=args.noise_multiplier, clip_norm=args.clip_norm,
      microbatch_size=args.microbatch_size or None, windows=args.windows, steps=args.steps,
      optimizer="optax.adamw(1e-4, weight_decay=0.05)")
  return result


def _installed_version(distribution: str) -> str | None:
  from importlib import metadata
  try:
    return metadata.version(distribution)
  except metadata.PackageNotFoundError:
    return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="vit_b16_224",
                      help="a model key of benchmarks.harness.MODELS")
  parser.add_argument("--microbatch_size", type=int, default=0,
                      help="clipped_grad's microbatch_size (0: None, the whole batch in one "
                           "vmap)")
  search.add_flags(parser, batches="128", steps=10)
  args = parser.parse_args()
  if args.batch:
    print(json.dumps(run_one(args)))
    return
  flags = search.common_flags(args) + [f"--model={args.model}",
                                       f"--microbatch_size={args.microbatch_size}"]
  search.run_and_print(
      "benchmarks.peers.jax_privacy_vit", BENCHMARK,
      search.configurations(["clipped_grad"], search.parse_batches(args.batches)),
      lambda config: [f"--batch={config['batch']}"] + flags, args)


if __name__ == "__main__":
  main()
