"""The mechanism's secret randomness, and separate key streams for everything else.

The DP guarantee assumes that the adversary cannot predict the Gaussian noise or the Poisson
batches. So their randomness is a **mechanism secret**: 128 bits of fresh OS entropy
(`secrets.token_bytes`) drawn by process 0 when a run starts, sent to every other process, kept in
the training checkpoint (so a resumed run is bit-identical to an uninterrupted one) and nowhere
else: not in the config, the checkpoint's JSON record, metrics, logs or results. The config's
`seed` keeps its public jobs (model init, public-data order, splits, augmentation), and nothing
that protects privacy depends on it.

The one exception is explicit: `dp.insecure_reproducible_seed` derives the secret from that
integer, for tests and debugging. Such a run's guarantee holds only while that integer stays
secret, and two runs given the same one draw the same standard-normal noise and the same batches
(two such releases together can cancel the noise). The privacy statement says so.

Secret layout (uint32 [4]): words 0-1 key the noise (a raw threefry key), words 2-3 seed the
Poisson sampler (`sampler_seed`). Public key streams: `stream_key(seed, name)` folds a stream id
derived from `name` into the seed's key, so no two uses share a key (`fold_in(key, 0)` equals
`split(key)[0]`, so small integers are not used as stream ids). `PRNGKey(seed)` itself is used by
model initialisation only.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

import jax
import numpy as np

SECRET_WORDS = 4


def fresh_secret() -> np.ndarray:
  """128 bits of OS entropy as uint32 [4], the same on every process (process 0 draws them)."""
  return agree_across_processes(
      np.frombuffer(secrets.token_bytes(4 * SECRET_WORDS), np.uint32).copy())


def fixed_secret(seed: int) -> np.ndarray:
  """The INSECURE reproducible secret derived from `seed` (uint32 [4]); see the module doc."""
  digest = hashlib.sha256(f"dpjax insecure reproducible seed {int(seed)}".encode()).digest()
  return np.frombuffer(digest[:4 * SECRET_WORDS], np.uint32).copy()


def agree_across_processes(secret: np.ndarray) -> np.ndarray:
  """Process 0's `secret` on every process (a no-op in a single-process run)."""
  if jax.process_count() == 1:
    return secret
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(secret), np.uint32)


def run_secret(insecure_reproducible_seed: int | None) -> np.ndarray:
  """A new run's secret: fresh entropy, or the fixed one when the insecure seed is given."""
  if insecure_reproducible_seed is None:
    return fresh_secret()
  return fixed_secret(insecure_reproducible_seed)


def check_secret(secret: np.ndarray) -> np.ndarray:
  secret = np.asarray(secret)
  if secret.shape != (SECRET_WORDS,) or secret.dtype != np.uint32:
    raise ValueError(f"A mechanism secret is uint32 [{SECRET_WORDS}], got {secret.dtype} "
                     f"{secret.shape}.")
  return secret


def noise_key(secret: np.ndarray) -> np.ndarray:
  """The noise transformation's initial raw PRNG key (uint32 [2])."""
  return check_secret(secret)[:2].copy()


def sampler_seed(secret: np.ndarray) -> int:
  """A 64-bit integer seeding the Poisson sampler (`sampling.PoissonSampler(seed=...)`)."""
  words = check_secret(secret)
  return (int(words[2]) << 32) | int(words[3])


def fresh_noise_key() -> np.ndarray:
  """A raw PRNG key (uint32 [2]) of fresh OS entropy, for a noise transformation given no seed."""
  return noise_key(fresh_secret())


def fresh_sampler_seed() -> int:
  """A 64-bit integer of fresh OS entropy, for a sampler given no seed."""
  return sampler_seed(fresh_secret())


def stream_id(name: str) -> int:
  """A 31-bit stream id for `name` (CRC-32), far from the small counters `split` uses."""
  return (zlib.crc32(name.encode()) & 0x7FFFFFFF) | 0x40000000


def stream_key(seed: int, name: str) -> jax.Array:
  """The PRNG key of the public stream `name` of the config seed `seed` (not for the mechanism)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream_id(name))
