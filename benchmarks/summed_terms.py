"""Formulations of an instantiated per-example gradient's norm and weighted sum (ghost clipping's
`ghost.terms.Summed`), timed alone on one device.

Ghost clipping instantiates a few small per-example gradients hᵢ (biases, norm scales, the ViT's
position embedding: hᵢ = gᵢ [T, d]) and needs their squared norms Σₖ hᵢₖ² [m] and their weighted
sum Σᵢ wᵢhᵢ (float32). On an H200 two kernels around the position embedding's weighted sum took
5.7 ms of a 64 ms ViT-B/16 step (`results/archive/throughput_h200_profile.json`). Each variant
here computes both from a bf16 h [m, T, d] (an argument: in the trainer h comes out of the
backward pass, whose fusions this leaves out); all took ~0.05 ms for [128, 197, 768], so the cost
was in XLA's fusion with the other layers' scalings (`ghost.terms.unshared`), not in the
formulation:

  python -m benchmarks.summed_terms --shape 128x197x768 --out $OUT/summed_terms.json

Prints ms per call (median of windows) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness

F32 = jnp.float32


def _flat_einsum(h, w, real):
  """[m, K] float32 rows; the weighted sum as one float32 matrix-vector product."""
  hf = h.reshape(h.shape[0], -1).astype(F32)
  sq = jnp.sum(jnp.square(hf), axis=-1)
  ws = jnp.einsum("m,mk->k", w, jnp.where(real[:, None], hf, 0.0),
                  precision=jax.lax.Precision.HIGHEST)
  return sq, ws.reshape(h.shape[1:])


def _flat_reduce(h, w, real):
  """[m, K] float32 rows; the weighted sum as a product and a reduction over the rows."""
  hf = h.reshape(h.shape[0], -1).astype(F32)
  sq = jnp.sum(jnp.square(hf), axis=-1)
  ws = jnp.sum(jnp.where(real[:, None], w[:, None] * hf, 0.0), axis=0)
  return sq, ws.reshape(h.shape[1:])


def _native_staged(h, w, real):
  """h kept [m, T, d] in its dtype; the norm reduced over d, then T; the sum over the rows."""
  hf = h.astype(F32)
  sq = jnp.sum(jnp.sum(jnp.square(hf), axis=-1), axis=-1)
  ws = jnp.sum(jnp.where(real[:, None, None], w[:, None, None] * hf, 0.0), axis=0)
  return sq, ws


def _native_dots(h, w, real):
  """The norm as a bf16 dot per (example, row) accumulated in float32; the sum as above."""
  sq = jnp.sum(jnp.einsum("mtd,mtd->mt", h, h, preferred_element_type=F32), axis=-1)
  ws = jnp.sum(jnp.where(real[:, None, None], w[:, None, None] * h.astype(F32), 0.0), axis=0)
  return sq, ws


def _transposed(h, w, real):
  """The rows moved last: [T·d, m] @ w as one float32 matrix-vector product."""
  hf = h.reshape(h.shape[0], -1).astype(F32)
  sq = jnp.sum(jnp.square(hf), axis=-1)
  ws = jnp.dot(hf.T, jnp.where(real, w, 0.0), precision=jax.lax.Precision.HIGHEST)
  return sq, ws.reshape(h.shape[1:])


VARIANTS: dict[str, Callable] = {"flat_einsum": _flat_einsum, "flat_reduce": _flat_reduce,
                                 "native_staged": _native_staged, "native_dots": _native_dots,
                                 "transposed": _transposed}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", default="128x197x768", help="m x T x d")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  m, t, d = (int(v) for v in args.shape.split("x"))
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((m, t, d)), jnp.bfloat16)
  w = jnp.asarray(rng.uniform(0.1, 1.0, m), F32)
  real = jnp.ones(m, bool)
  reference = None
  rows = []
  for name in args.variants.split(","):
    fn = jax.jit(VARIANTS[name])
    sq, ws = fn(h, w, real)
    if reference is None:
      reference = (np.asarray(sq), np.asarray(ws))
    error = max(float(np.max(np.abs(np.asarray(sq) - reference[0]) / reference[0])),
                float(np.max(np.abs(np.asarray(ws) - reference[1]))
                      / float(np.max(np.abs(reference[1])))))
    _, seconds = harness.time_steps(lambda: fn(h, w, real), args.windows, args.steps)
    rows.append(dict(variant=name, ms=1e3 * seconds, max_rel_error=error))
    print(f"{name:15s} {1e3 * seconds:8.3f} ms  max rel. error vs first {error:.1e}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(rows=rows, shape=args.shape, **harness.device_facts()), f, indent=2)


if __name__ == "__main__":
  main()
