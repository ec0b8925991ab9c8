"""The Gaussian mechanism as an optax transformation, and the DP optimizer built on it.

`add_gaussian_noise` expects as its input updates the *sum* of clipped per-example gradients (from
`dpjax.privacy.clipping.clipped_grad_sum`) and returns

    (Σ_i clip(g_i) + N(0, (σ·S)² I)) / B_expected

with the noise drawn in float32 whatever the parameter dtype, from a PRNG key kept in the
transformation's state (so a checkpoint of the optimizer state carries it and a resumed run draws
the same noise). That key is secret: by default it is fresh OS entropy (`init_noise_state`), and
an optimizer state (a checkpoint) that holds it must be kept as private as the data.
The normals come from a Box–Muller sampler whose radius is exact out to
sqrt(210·ln 2) ≈ 12.06 standard deviations (`gaussian_noise_like`); a float sampler's tail has to
end somewhere, and `tail_delta` is the δ that its missing mass (2^-105 per pair of normals) costs.

Privacy: with S the clip rule's sensitivity, one call is the Gaussian mechanism with noise
multiplier σ on the clipped sum; it must be called exactly once per step (the state's `count`
says how many times it was). Dividing by the *expected* batch size q·N, never the realised one,
keeps the batch size (which depends on the private data under Poisson sampling) unreleased.
A step may also release its count of clipped examples with noise (`ClipCountRelease`), drawn from
the same secret key chain; `dpjax.privacy.calibration.effective_noise_multiplier` accounts both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.privacy import randomness

PyTree = Any


class NoiseState(NamedTuple):
  """key: raw uint32 PRNG key [2] for the next step; count: number of noised steps so far."""
  key: jax.Array
  count: jax.Array


def _check(noise_multiplier: float, sensitivity: float, expected_batch_size: float) -> None:
  if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
    raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}.")
  if not (math.isfinite(sensitivity) and sensitivity > 0):
    raise ValueError(f"sensitivity must be finite and > 0, got {sensitivity!r}.")
  if not (math.isfinite(expected_batch_size) and expected_batch_size > 0):
    raise ValueError(
        f"expected_batch_size must be > 0 (it is q·N, the expected private batch size), got "
        f"{expected_batch_size!r}.")


def gaussian_noise_like(key: jax.Array, tree: PyTree, stddev: float,
                        split: PyTree | None = None) -> PyTree:
  """Independent N(0, stddev²) float32 noise for every leaf of `tree`.

  The normals are Box–Muller pairs (`_box_muller`) with a 104-bit radius uniform: their radius
  is exact out to sqrt(210·ln 2) ≈ 12.06 standard deviations, where `jax.random.normal` (the
  inverse CDF of a 23-bit uniform) stops at -5.42 and +5.22. A flat draw of n values takes
  ceil(n/2) pairs, four random 32-bit words each; `tail_delta` accounts the tail beyond 12.06.

  Each random-number draw is code for XLA to generate and compile, so leaves are drawn together
  (`benchmarks/compile_time.py`, H200: a ViT-B/16's DP apply step compiled in 48.7 s with one draw
  per leaf, 200 of them; 11.5-13 s with one per shape, 12; 4.8 s with one flat draw computed
  once, `_materialized`; the non-private apply step in 3.1 s):
    * leaves not split over devices (all of them when `split` is None) take consecutive pieces of
      ONE flat draw, in tree order;
    * leaves that `split` marks True (split over devices, e.g. by an 'fsdp' mesh axis: see
      `dpjax.parallel.split_leaves`) take rows of one [count, *shape] draw per distinct shape,
      which each device can generate shard by shard (a pair's two values are rows i and
      ceil(count/2) + i, so no value moves between devices); cut from a flat draw, they would
      make XLA move noise between devices.
  Every element is an independent draw either way. With jax's partitionable threefry the values
  depend on the key, the shapes and `split`, not on where the arrays live.

  Args:
    key: a PRNG key.
    tree: a pytree of arrays (or ShapeDtypeStructs); only the leaves' shapes are read.
    stddev: the standard deviation.
    split: None, or a pytree of bools with `tree`'s structure.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  split_flags = [False] * len(leaves) if split is None else _flags_like(treedef, split, "split")
  flat_key, shaped_key = jax.random.split(key)
  noise = [None] * len(leaves)
  whole = [i for i, is_split in enumerate(split_flags) if not is_split]
  sizes = [math.prod(jnp.shape(leaves[i])) for i in whole]
  if whole:
    draw = _normals(flat_key, (sum(sizes),), stddev)
    offset = 0
    for index, size in zip(whole, sizes):
      noise[index] = draw[offset:offset + size].reshape(jnp.shape(leaves[index]))
      offset += size
  by_shape: dict[tuple, list[int]] = {}
  for index, is_split in enumerate(split_flags):
    if is_split:
      by_shape.setdefault(tuple(jnp.shape(leaves[index])), []).append(index)
  keys = jax.random.split(shaped_key, max(len(by_shape), 1))
  for k, (shape, indices) in zip(keys, by_shape.items()):
    draw = _normals(k, (len(indices),) + shape, stddev)
    for row, index in enumerate(indices):
      noise[index] = draw[row]
  return jax.tree_util.tree_unflatten(treedef, noise)


def _normals(key: jax.Array, shape: tuple, stddev: float) -> jax.Array:
  """N(0, stddev²) float32 values of `shape` (rank >= 1): ceil(shape[0]/2) rows of Box–Muller
  pairs, cosines in the first rows and sines in the rest (the last sine row dropped when
  shape[0] is odd). Pairing along the leading axis keeps the draw elementwise in the other
  axes, which may be split over devices. The two halves are `_materialized` together, before
  the concatenation: a kernel writing the concatenation would compute each pair twice."""
  words = jax.random.bits(key, (4, -(-shape[0] // 2)) + tuple(shape[1:]), jnp.uint32)
  halves = _materialized(tuple(stddev * z for z in _box_muller(words)))
  return jnp.concatenate(halves)[:shape[0]]


def _box_muller(words: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two independent N(0, 1) float32 arrays from uint32 words [4, ...] (independent uniform bits).

  Radius: word 0's top bit picks a half of (0, 1); the other 103 bits (word 0's low 31, words 1
  and 2, word 3's low 8) form k, uniform on [0, 2^103), and v = (k + 1/2)·2^-104, summed in
  float32 smallest terms first (a normal float32 in [2^-105, 1/2]). The uniform is u = v or
  u = 1 - v, and r = sqrt(-2 ln u) with ln u computed as ln v or log1p(-v): float32's relative
  precision in both halves (a float32 u near 1 would leave no radius between 0 and 3.5e-4).
  In exact arithmetic u is a uniform U on (0, 1) taken at the midpoint of its cell of width
  2^-104, so r is the exact radius sqrt(-2 ln U) rounded, except when U < 2^-105: then the exact
  radius exceeds the largest here, sqrt(210·ln 2) ≈ 12.06 (k = 0, lower half). That happens with
  probability exp(-r_max²/2) = 2^-105 per pair; `tail_delta` accounts it.

  Angle: the top 24 bits of word 3, read as a signed integer s in [-2^23, 2^23), give
  θ = π·s·2^-23, a uniform grid of 2^24 angles on [-π, π) that float32 resolves (its spacing,
  3.7e-7, exceeds float32's at π, 2.4e-7) and that is symmetric under θ -> -θ and θ -> θ + π/2,
  so cosines and sines have the same symmetric distribution.

  Returns: (r·cos θ, r·sin θ), each shaped like words[0].
  """
  w0, w1, w2, w3 = words
  as_float = lambda w: w.astype(jnp.float32)
  low = (as_float(w3 & 0xFF) + 0.5) * 2.0 ** -104
  v = as_float(w0 & 0x7FFFFFFF) * 2.0 ** -32 + (
      as_float(w1) * 2.0 ** -64 + (as_float(w2) * 2.0 ** -96 + low))
  log_u = jnp.where(w0 >> 31 == 0, jnp.log(v), jnp.log1p(-v))
  radius = jnp.sqrt(-2.0 * log_u)
  angle = as_float(jax.lax.bitcast_convert_type(w3, jnp.int32) >> 8) * (math.pi * 2.0 ** -23)
  return radius * jnp.cos(angle), radius * jnp.sin(angle)


def values_per_step(params: PyTree, trainable: PyTree | None = None) -> int:
  """How many noise values one step draws for `params` (trainable leaves only): the
  `num_draws_per_step` of `tail_delta`."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  flags = [True] * len(leaves) if trainable is None else _flags_like(treedef, trainable,
                                                                       "trainable")
  return int(sum(math.prod(jnp.shape(p)) for p, t in zip(leaves, flags) if t))


PAIR_TAIL_PROBABILITY = 2.0 ** -105
"""P(the exact radius of a Box–Muller pair exceeds `_box_muller`'s largest, sqrt(210·ln 2))."""


def tail_delta(num_draws_per_step: int, steps: int, epsilon: float) -> float:
  """The δ to add to a run's (ε, δ) for the normals' tail that the sampler cannot draw.

  Args:
    num_draws_per_step: the number of noise values drawn per step (the trainable parameters).
    steps: the number of noised steps.
    epsilon: the run's ε.

  Returns: (1 + e^ε)·η with η = steps·num_draws_per_step·2^-105.

  Privacy: if the run with exact Gaussian noise is (ε, δ)-DP, the run with this sampler is
  (ε, δ + tail_delta(...))-DP, up to float rounding (below). Couple the two runs pair by pair:
  the exact radius and angle come from uniforms U and Θ, the sampler's from their cells (U's of
  width 2^-104, Θ's of width 2π·2^-24; `_box_muller`), so its values are the exact ones rounded
  unless U < 2^-105, where the exact radius is beyond the sampler's largest: probability 2^-105
  per pair. A step draws at most one pair per value it uses (ceil(n/2) for a draw of n values,
  ceil(count/2)·size for `count` split leaves of one shape), so the noise of the whole run
  differs beyond rounding with probability at most η, whatever the data. The run's output is a
  function of the data and the noise, so its distributions under the two samplers are within η
  in total variation, and for any set S of outputs and neighbours D, D':
    P[ours(D) ∈ S] <= P[exact(D) ∈ S] + η <= e^ε·P[exact(D') ∈ S] + δ + η
                   <= e^ε·P[ours(D') ∈ S] + δ + (1 + e^ε)·η.
  For a ViT-B/16 run (86M parameters, 10^5 steps, ε = 10) this is 4.7e-15. (`jax.random.normal`,
  whose draws end at -5.42σ and +5.22σ, misses a mass of 1.2e-7 per value.)

  Not covered: the rounding. The noise takes finitely many float32 values. A pair lies on one of
  2^24 rays, 3.7e-7 rad apart, a few times float32's angular resolution; its radius is resolved
  finer than float32's spacing out to 11.0σ, but beyond (U < 2^-87.5, probability 4e-14 over
  the ViT-B run above) consecutive radii are further apart, up to 0.09σ in the last cell. An
  adversary who knows every other example and replays the float arithmetic bit for bit could
  test whether an observed pair is reachable without the target example, as in Mironov's attack
  on floating-point Laplace noise ("On significance of the least significant bits for
  differential privacy", CCS 2012). Every floating-point sampler has such structure
  (`jax.random.normal` draws 2^23 values per coordinate, 3e-7σ apart near 0 and further in the
  tails); this δ does not bound it, and closing it takes another mechanism (e.g. discrete
  Gaussian noise on a fixed-point grid).
  """
  if not (isinstance(num_draws_per_step, int) and num_draws_per_step >= 0
          and isinstance(steps, int) and steps >= 0):
    raise ValueError(f"num_draws_per_step and steps must be integers >= 0, got "
                     f"{num_draws_per_step!r} and {steps!r}.")
  if not (math.isfinite(epsilon) and epsilon >= 0):
    raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}.")
  return (1 + math.exp(epsilon)) * steps * num_draws_per_step * PAIR_TAIL_PROBABILITY


def _flags_like(treedef, flags: PyTree, name: str) -> list:
  """`flags` flattened to the leaves of `treedef`, or a ValueError saying what does not match."""
  try:
    return treedef.flatten_up_to(flags)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{name} must be a pytree of bools with the structure of the updates "
                     f"(the params): {e}") from None


def _materialized(draw: PyTree) -> PyTree:
  """The draw computed once, as its own kernel. Without the barrier XLA's GPU fusion duplicates
  the threefry code into consumers of the draw's pieces (60 instead of 40 of its shifts in the
  optimized HLO), and a ViT-B/16's apply step compiles in 7.9 s instead of 4.2 s on an H200
  (2.2 s without noise)."""
  return jax.lax.optimization_barrier(draw)


def init_noise_state(seed: int | np.ndarray | None = None) -> NoiseState:
  """The state of a fresh noise transformation (no step noised yet).

  seed: None (the default) for a key of fresh OS entropy (`randomness.fresh_noise_key`); a raw
  uint32 [2] key (the trainer's, from its run secret `randomness.noise_key`); or an int, which
  makes the noise reproducible and INSECURE: the guarantee then holds only while that int stays
  secret, and every transformation given the same int draws the same noise.
  Call it outside `jax.jit`: under jit a fresh key would become a constant of the compiled program
  (and JAX's persistent compilation cache would write it to disk).
  """
  if seed is None:
    key = randomness.fresh_noise_key()
  elif isinstance(seed, (int, np.integer)):
    key = jax.random.PRNGKey(seed)
  else:
    key = np.asarray(seed)
    if key.shape != (2,) or key.dtype != np.uint32:
      raise ValueError(f"seed must be None, an int or a raw uint32 [2] key, got {key.dtype} "
                       f"{key.shape}.")
  return NoiseState(key=jnp.asarray(key), count=jnp.zeros([], jnp.int32))


def add_gaussian_noise(noise_multiplier: float, sensitivity: float, expected_batch_size: float,
                       seed: int | np.ndarray | None = None, trainable: PyTree | None = None,
                       split: PyTree | None = None) -> optax.GradientTransformation:
  """Noises a clipped gradient sum and averages it over the expected batch size.

  Args:
    noise_multiplier: σ; the noise standard deviation is σ·sensitivity.
    sensitivity: S, the L2 bound on one example's contribution to the input sum.
    expected_batch_size: B = q·N, the divisor (public, fixed).
    seed: the PRNG key held in the state (`init_noise_state`): None (default) draws fresh OS
      entropy at each `init` (the noise is secret, as the guarantee needs); a raw key; or an int
      for INSECURE reproducible noise.
    trainable: optional pytree of bools like params; False leaves get no noise and a zero update.
    split: optional pytree of bools like params, True for leaves split over devices
      (`dpjax.parallel.split_leaves(layout.params)`): how the noise is drawn, see
      `gaussian_noise_like`. Performance only; the noise's distribution is the same.

  Input updates: the clipped sum, leaves shaped like params. Output: the noisy mean, each leaf in
  its input dtype (the noise itself is float32).
  """
  _check(noise_multiplier, sensitivity, expected_batch_size)
  stddev = float(noise_multiplier) * float(sensitivity)

  def init_fn(params):
    del params
    return init_noise_state(seed)

  def update_fn(updates, state, params=None):
    del params
    step_key, next_key = jax.random.split(state.key)
    drawn, drawn_split = updates, split
    if trainable is not None:  # frozen leaves (None here) are not drawn for
      _flags_like(jax.tree_util.tree_structure(updates), trainable, "trainable")
      drawn = jax.tree_util.tree_map(lambda g, t: g if t else None, updates, trainable)
      if split is not None:
        drawn_split = jax.tree_util.tree_map(lambda s, t: s if t else None, split, trainable)
    noise = gaussian_noise_like(step_key, drawn, stddev, drawn_split)
    noisy = jax.tree_util.tree_map(
        lambda g, z: (jnp.zeros_like(g) if z is None else
                      ((g.astype(jnp.float32) + z) / expected_batch_size).astype(g.dtype)),
        updates, noise, is_leaf=lambda x: x is None)
    return noisy, NoiseState(key=next_key, count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


COUNT_STREAM = randomness.stream_id("clip count noise")


def count_noise_key(state: NoiseState) -> jax.Array:
  """The key of the clip count's noise at the step `state` is about to noise.

  The gradient's noise of that step comes from `split(state.key)[0]` (split again inside
  `gaussian_noise_like`), the next step's key is `split(state.key)[1]`; the count's is the step
  key folded with a 31-bit stream id, far from the small counters that `split` hashes. So it is
  as secret as the gradient's noise key (never derived from the config seed) and never equal to
  a key that draws the gradient's noise."""
  return jax.random.fold_in(jax.random.split(state.key)[0], COUNT_STREAM)


@dataclasses.dataclass(frozen=True)
class ClipCountRelease:
  """The Gaussian mechanism on a private step's number of clipped examples.

  stddev: σ_c > 0, the noise's standard deviation (the count's sensitivity is 1,
    `clip_stats.ClipStats`).
  expected_batch_size: B = q·N, the public divisor that turns the count into a fraction.

  Privacy: one call releases num_clipped + N(0, σ_c²), a Gaussian mechanism of noise multiplier
  σ_c, on the same Poisson sample as the step's gradient release;
  `dpjax.privacy.calibration.effective_noise_multiplier` accounts the two together. It must be
  called with the step's noise state before `add_gaussian_noise` moves the key on, at most once
  per step.
  """
  stddev: float
  expected_batch_size: float

  def __post_init__(self):
    if not (math.isfinite(self.stddev) and self.stddev > 0):
      raise ValueError(f"The clip count's noise stddev must be finite and > 0, got "
                       f"{self.stddev!r} (0: build no ClipCountRelease, nothing is released).")
    if not (math.isfinite(self.expected_batch_size) and self.expected_batch_size > 0):
      raise ValueError(f"expected_batch_size must be > 0, got {self.expected_batch_size!r}.")

  def noisy_count(self, num_clipped: jax.Array, state: NoiseState) -> jax.Array:
    """num_clipped + N(0, σ_c²) in float32, its noise from `count_noise_key(state)`."""
    z = _normals(count_noise_key(state), (1,), self.stddev)[0]  # the exact-tail sampler too
    return jnp.asarray(num_clipped, jnp.float32) + z

  def noisy_fraction(self, num_clipped: jax.Array, state: NoiseState) -> jax.Array:
    """The noisy count over the expected batch size: what the trainer logs."""
    return self.noisy_count(num_clipped, state) / jnp.float32(self.expected_batch_size)


def dp_optimizer(optimizer: optax.GradientTransformation, *, noise_multiplier: float,
                 sensitivity: float, expected_batch_size: float,
                 seed: int | np.ndarray | None = None,
                 trainable: PyTree | None = None, split: PyTree | None = None
                 ) -> optax.GradientTransformation:
  """A DP optimizer: Gaussian noise on the clipped sum, then any optax optimizer.

  Feed it `clipped_grad_sum(...).grad_sum` as the gradient. With `trainable`, frozen leaves get
  neither noise nor any update (weight decay included). `seed`, `split`: see `add_gaussian_noise`
  (leave `seed` None: the noise key is then fresh OS entropy).
  """
  noise = add_gaussian_noise(noise_multiplier, sensitivity, expected_batch_size, seed, trainable,
                             split)
  if trainable is None:
    return optax.chain(noise, optimizer)
  labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
  return optax.chain(noise, optax.multi_transform(
      {"train": optimizer, "frozen": optax.set_to_zero()}, labels))


def noise_state(opt_state: PyTree) -> NoiseState:
  """Finds the (single) `NoiseState` inside an optimizer state built with `dp_optimizer`."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, NoiseState)) if isinstance(s, NoiseState)]
  if len(found) != 1:
    raise ValueError(f"Expected exactly one NoiseState in the optimizer state, found {len(found)}.")
  return found[0]
