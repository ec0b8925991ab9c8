"""Memory of Logit-DP's (and naive DP's) clipped sum by pair method, from XLA's estimate of the
compiled function (`jax.jit(f).lower(...).compile().memory_analysis()` on abstract arguments:
nothing is allocated or run; on CPU, temp + arguments + outputs − aliased, as
`dpjax.train.microbatch_size.compiled_memory_bytes`).

The encoder is the contrastive trainer's: `models.ProjectedEncoder` over a WRN (GroupNorm,
weight-standardised convs: the ResNet-like network without BatchNorm of Kong et al.).

  python -m benchmarks.contrastive_memory --n 32 --depth 16 --width 1 --out /tmp/m.json

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import jax
import jax.numpy as jnp

from dpjax import contrastive, models
from dpjax.privacy import ghost


def encoder(depth: int, width: int, image: int, representation: int, hidden: int, dim: int):
  """(embed_fn with ghost variables, abstract params, parameter count)."""
  backbone = models.build_model("wrn", num_classes=representation, depth=depth, width=width,
                                input_shape=(image, image, 3))
  model = models.ProjectedEncoder(backbone, hidden, dim)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image, image, 3)))["params"]

  def embed(p, views, ghost_variables=None):
    out = ghost.apply_model(model, p, views, ghost_variables)
    return out[0] if ghost_variables is None else (out[0][0], out[1])
  count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
  return embed, params, count


def measure(method: str, pair_method: str, args, n: int, image: int, row_chunk: int) -> dict:
  embed, params, count = encoder(args.depth, args.width, image, args.representation,
                                 args.hidden, args.dim)
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
  return dict(method=method, pair_method=pair_method, n=n, d=args.dim, image=image,
              params=count, row_chunk=row_chunk, temp_bytes=int(a.temp_size_in_bytes),
              total_bytes=int(total), jacobian_floats=2 * n * args.dim * count,
              compile_s=round(seconds, 1), backend=jax.default_backend())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=32)
  parser.add_argument("--image", type=int, default=32)
  parser.add_argument("--depth", type=int, default=16)
  parser.add_argument("--width", type=int, default=1)
  parser.add_argument("--representation", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--row_chunk", type=int, default=8)
  parser.add_argument("--methods", default="logit_dp:jacobian,logit_dp:ghost,naive:jacobian,"
                                           "naive:ghost")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = []
  print("| method | pair_method | n | d | params | XLA temp (MiB) | total (MiB) | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for entry in args.methods.split(","):
    method, pair_method = entry.split(":")
    row = measure(method, pair_method, args, args.n, args.image, args.row_chunk)
    rows.append(row)
    print(f"| {method} | {pair_method} | {row['n']} | {row['d']} | {row['params']} | "
          f"{row['temp_bytes'] / 2**20:.1f} | {row['total_bytes'] / 2**20:.1f} | "
          f"{row['compile_s']} |", flush=True)
    if args.out:
      with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
