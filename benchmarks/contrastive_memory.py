"""Memory and FLOPs of Logit-DP's (and naive DP's) clipped sum by pair method, from XLA's
estimates for the compiled function (`jax.jit(f).lower(...).compile()` on abstract arguments:
nothing is allocated or run). Memory: `memory_analysis()`, on CPU temp + arguments + outputs −
aliased, as `dpjax.train.microbatch_size.compiled_memory_bytes`. FLOPs: `cost_analysis()`, which
counts a loop's body once: the pair paths loop over blocks of rows or shifts, so the FLOPs of one
step are those of a compile with `--row_chunk` = n (one block, no loop); the memory of a step
is that of the row_chunk it will run with.

The encoder is the contrastive trainer's: `models.ProjectedEncoder` over a WRN (GroupNorm,
weight-standardised convs) or the ResNet-18-like network with GroupNorm (`--model resnet18`),
the ResNet-like networks without BatchNorm of Kong et al.

  python -m benchmarks.contrastive_memory --n 32 --depth 16 --width 1 --out /tmp/m.json
  python -m benchmarks.contrastive_memory --model resnet18 --width 16 --n 8 --row_chunk 8 \
      --methods logit_dp:ghost --dtype bfloat16

`--time_steps K` also runs the compiled sum K times (after one warm-up call) on random views and
an initialised encoder, and reports the median seconds per call: on a GPU, the step time of the
trainer's grad sum alone (no data pipeline, noise or optimizer). `--n` and `--row_chunk` take
comma-separated lists (one row_chunk per n, or one for all).

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import contrastive, models
from dpjax.train import contrastive_loop


def encoder(args, image: int, representation: int, hidden: int, dim: int):
  """(embed_fn with ghost variables, computing in args.dtype, abstract params, parameter
  count, a function returning initialised params)."""
  kwargs = (dict(depth=args.depth, width=args.width) if args.model == "wrn" else
            dict(width=args.width, num_groups=min(16, args.width)))
  backbone = models.build_model(args.model, num_classes=representation,
                                input_shape=(image, image, 3), **kwargs)
  model = models.ProjectedEncoder(backbone, hidden, dim)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, image, image, 3)))["params"]
  params = jax.eval_shape(init)
  embed = contrastive_loop.make_embed(model, args.dtype)
  count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
  return embed, params, count, init


def time_calls(compiled, params, n: int, image: int, calls: int) -> float:
  """Median seconds of one call of `compiled` on random views, after one warm-up call."""
  views = jax.random.uniform(jax.random.PRNGKey(1), (2, n, image, image, 3))
  args = (params, views[0], views[1], jnp.ones(n, bool))
  jax.block_until_ready(compiled(*args))
  seconds = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def measure(method: str, pair_method: str, args, n: int, image: int, row_chunk: int) -> dict:
  embed, params, count, init = encoder(args, image, args.representation, args.hidden, args.dim)
  fn = contrastive.logit_dp_grad_sum if method == "logit_dp" else contrastive.naive_grad_sum
  clip = {"pair_clip_norm" if method == "logit_dp" else "row_clip_norm": 1.0}
  run = functools.partial(fn, embed, temperature=0.5, row_chunk=row_chunk,
                          pair_method=pair_method, **clip)
  views = jax.ShapeDtypeStruct((n, image, image, 3), jnp.float32)
  start = time.perf_counter()
  compiled = jax.jit(lambda p, a, b, m: run(p, a, b, m).grad_sum).lower(
      params, views, views, jax.ShapeDtypeStruct((n,), jnp.bool_)).compile()
  seconds = time.perf_counter() - start
  a = compiled.memory_analysis()
  total = a.temp_size_in_bytes + a.argument_size_in_bytes + a.output_size_in_bytes - \
      a.alias_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(method=method, pair_method=pair_method, model=args.model, width=args.width,
              dtype=args.dtype, n=n, d=args.dim, image=image,
              params=count, row_chunk=row_chunk, temp_bytes=int(a.temp_size_in_bytes),
              total_bytes=int(total), jacobian_floats=2 * n * args.dim * count,
              flops=float(cost.get("flops", 0.0)), compile_s=round(seconds, 1),
              step_s=(time_calls(compiled, jax.jit(init)(), n, image, args.time_steps)
                      if args.time_steps else None),
              backend=jax.default_backend(), device=jax.devices()[0].device_kind)


def row_chunk_of(row: dict) -> str:
  return f"{row['row_chunk']}" + (" (one block)" if row["row_chunk"] >= row["n"] else "")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", default="32", help="batch sizes, comma-separated")
  parser.add_argument("--image", type=int, default=32)
  parser.add_argument("--model", default="wrn", choices=("wrn", "resnet18"))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--depth", type=int, default=16)
  parser.add_argument("--width", type=int, default=1)
  parser.add_argument("--representation", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--row_chunk", default="8", help="one per --n, or one for all")
  parser.add_argument("--time_steps", type=int, default=0, help="timed calls (0: none)")
  parser.add_argument("--methods", default="logit_dp:jacobian,logit_dp:ghost,naive:jacobian,"
                                           "naive:ghost")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = []
  print("| method | pair_method | model | n | d | params | row_chunk | XLA temp (MiB) | "
        "total (MiB) | GFLOP (one block) | compile s | step s |")
  print("|---" * 12 + "|")
  sizes = [int(n) for n in args.n.split(",")]
  chunks = [int(c) for c in args.row_chunk.split(",")]
  chunks = chunks * len(sizes) if len(chunks) == 1 else chunks
  if len(chunks) != len(sizes):
    raise SystemExit(f"--row_chunk needs one value, or one per --n ({len(sizes)}).")
  for (n, row_chunk), entry in itertools.product(zip(sizes, chunks), args.methods.split(",")):
    method, pair_method = entry.split(":")
    row = measure(method, pair_method, args, n, args.image, row_chunk)
    rows.append(row)
    print(f"| {method} | {pair_method} | {args.model}-{args.width} {args.dtype} | {row['n']} | "
          f"{row['d']} | {row['params']} | {row_chunk_of(row)} | "
          f"{row['temp_bytes'] / 2**20:.1f} | {row['total_bytes'] / 2**20:.1f} | "
          f"{row['flops'] / 1e9:.1f} | {row['compile_s']} | "
          f"{'—' if row['step_s'] is None else round(row['step_s'], 3)} |", flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
