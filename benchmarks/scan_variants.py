"""Compile time and speed of a ViT's non-private gradient step with its blocks unrolled or under
`nn.scan` (with unroll and attention variants): what scanning costs at run time for what it saves
at compile time.

  python -m benchmarks.scan_variants --out /tmp/scan.json

Prints a markdown table and writes JSON. Random data; bf16 compute, f32 params; ms is the median
over windows of `--steps` steps dispatched without per-step synchronisation.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from dpjax import models
from dpjax.train import step as step_lib

VARIANTS = {"unrolled": dict(), "scan": dict(scan_blocks=True),
            "scan_unroll2": dict(scan_blocks=True, scan_unroll=2),
            "scan_unroll4": dict(scan_blocks=True, scan_unroll=4),
            "unrolled_einsum": dict(attention="einsum"),
            "scan_einsum": dict(scan_blocks=True, attention="einsum")}


def run(model_key: str, variant: str, batch: int, steps: int, windows: int) -> dict:
  kwargs, shape, classes = harness.MODELS[model_key]
  kwargs = {**kwargs, **VARIANTS[variant]}
  model = models.build_model(kwargs.pop("name"), num_classes=classes, input_shape=shape, **kwargs)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))["params"]
  losses = step_lib.make_batch_losses(model, "bfloat16")
  grad = jax.jit(jax.grad(lambda p, b: jnp.mean(losses(p, b))))
  rng = np.random.default_rng(0)
  data = dict(image=jnp.asarray(rng.standard_normal((batch,) + shape), jnp.float32),
              label=jnp.asarray(rng.integers(0, classes, batch), jnp.int32))
  first_s, step_s = harness.time_steps(lambda: grad(params, data), windows, steps)
  ms = 1e3 * step_s
  return dict(model=model_key, variant=variant, batch=batch, step_ms=ms,
              examples_per_s=1e3 * batch / ms, compile_s=first_s - step_s,
              **harness.device_facts())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="vit_b16_224")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rows = []
  print("| variant | step ms | examples/s | compile s |\n|---|---|---|---|")
  for variant in args.variants.split(","):
    rows.append(run(args.model, variant, args.batch, args.steps, args.windows))
    r = rows[-1]
    print(f"| {variant} | {r['step_ms']:.1f} | {r['examples_per_s']:,.0f} | {r['compile_s']:.1f} |",
          flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(dict(rows=rows, command="python -m benchmarks.scan_variants " +
                       " ".join(sys.argv[1:])), f, indent=2)


if __name__ == "__main__":
  main()
