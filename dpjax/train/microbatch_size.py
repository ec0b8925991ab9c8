"""Automatic microbatch size: the largest one whose accumulate step XLA says fits in free memory.

`perf.microbatch_size = 0` asks the trainer for this. The microbatch size is a performance setting
only: it decides how each Poisson batch is cut into fixed-shape padded pieces for the jitted
accumulate step, never which examples are sampled, the clip norm, the sensitivity, the noise or
the accounting (the clipped sum is the same up to float rounding). The choice depends on the
model, the data's shapes and the machine's free memory, never on the private data's values, so
choosing it this way never changes the privacy guarantee.

The estimate is XLA's own, from compiling the step on abstract arguments (`jax.ShapeDtypeStruct`:
nothing is allocated): temporaries + arguments + outputs − donated (aliased) buffers, per device.
It counts the params although they already live in memory (and in `bytes_in_use`), which errs on
the safe side. A compiled candidate stays in jax's cache, so the chosen size is not compiled
again when training starts.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

PyTree = Any

_SET_IT = "Set perf.microbatch_size to a positive multiple of the number of devices instead."


class MicrobatchSizeError(ValueError):
  """No microbatch size can be chosen automatically (none fits, or XLA gives no estimate)."""


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> int:
  """XLA's estimate of the device memory a compiled function needs, in bytes (per device).

  temp + argument + output − alias sizes of `compiled.memory_analysis()` (the largest, where a
  backend gives one analysis per device). Raises MicrobatchSizeError when it gives none.
  """
  try:
    analysis = compiled.memory_analysis()
  except NotImplementedError:
    analysis = None
  per_device = list(analysis) if isinstance(analysis, (list, tuple)) else [analysis]
  if not per_device or any(a is None for a in per_device):
    raise MicrobatchSizeError(
        f"XLA gives no memory estimate on this backend ({jax.default_backend()}: "
        f"memory_analysis() returned None), so the microbatch size cannot be chosen "
        f"automatically (perf.microbatch_size = 0). {_SET_IT}")
  return max(int(a.temp_size_in_bytes + a.argument_size_in_bytes + a.output_size_in_bytes
                 - a.alias_size_in_bytes) for a in per_device)


def measure_jitted(jitted: Any, args_for: Callable[[int], tuple]) -> Callable[[int], int]:
  """compiled_bytes(m): XLA's estimate for `jitted(*args_for(m))`, compiled but never run.

  jitted: a `jax.jit` function; args_for(m) its arguments for microbatch size m, preferably
  `jax.ShapeDtypeStruct`s (`abstract_rows`). Each call compiles once (seconds for a large model).
  """
  return lambda m: compiled_memory_bytes(jitted.lower(*args_for(m)).compile())


def abstract_rows(rows_of_one: PyTree, rows: int, sharding: Any = None) -> PyTree:
  """ShapeDtypeStructs [rows, ...] like `rows_of_one`'s leaves [1, ...] (same trailing shapes and
  dtypes), laid out by `sharding` (e.g. split by rows over a mesh) when given."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((rows,) + np.shape(x)[1:], np.asarray(x).dtype,
                                     sharding=sharding), rows_of_one)


def candidate_sizes(expected_batch_size: float, multiple_of: int = 1) -> list[int]:
  """multiple_of · 2^k for k = 0, 1, ... up to the expected batch size (always multiple_of).

  multiple_of: the number of devices a microbatch is split over (each gets m / devices rows).
  """
  if multiple_of <= 0:
    raise ValueError(f"multiple_of must be > 0, got {multiple_of}.")
  sizes = [int(multiple_of)]
  while 2 * sizes[-1] <= expected_batch_size:
    sizes.append(2 * sizes[-1])
  return sizes


def choose_microbatch_size(compiled_bytes: Callable[[int], int], free_bytes: int,
                           candidates: Sequence[int], safety: float = 0.9) -> int:
  """The largest candidate m with compiled_bytes(m) <= safety · free_bytes.

  Assumes compiled_bytes grows with m (a larger microbatch never needs less memory), so it
  measures the largest candidate first (it often fits), then halves the range: at most
  1 + ⌈log2(len(candidates))⌉ measurements.

  Raises:
    MicrobatchSizeError: when even the smallest candidate does not fit (the message says what
      to change).
  """
  sizes = sorted({int(c) for c in candidates})
  if not sizes or sizes[0] <= 0:
    raise ValueError(f"candidates must be positive sizes, got {list(candidates)}.")
  if not 0 < safety <= 1:
    raise ValueError(f"safety must be in (0, 1], got {safety}.")
  budget = safety * free_bytes
  measured: dict[int, int] = {}

  def fits(m: int) -> bool:
    if m not in measured:
      measured[m] = int(compiled_bytes(m))
    return measured[m] <= budget

  if fits(sizes[-1]):
    return sizes[-1]
  lo, hi = -1, len(sizes) - 1  # sizes[hi] does not fit; sizes[lo] fits (-1: none found yet)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(sizes[mid]) else (lo, mid)
  if lo < 0:
    raise MicrobatchSizeError(
        f"Even the smallest microbatch size, {sizes[0]}, needs {_mib(measured[sizes[0]])} per "
        f"device by XLA's estimate, more than the {_mib(budget)} allowed ({safety:g} of "
        f"{_mib(free_bytes)} free). Use less memory per example (perf.per_example_method="
        f"'ghost', perf.remat=True, perf.dtype='bfloat16', or mesh.fsdp > 1), raise "
        f"perf.memory_fraction, or set perf.microbatch_size explicitly.")
  return sizes[lo]


def _mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:.1f} MiB"


def free_memory_bytes(devices: Sequence[jax.Device]) -> int:
  """The least free memory of `devices` (this process's devices of the mesh), in bytes.

  Accelerators: bytes_limit − bytes_in_use of `memory_stats()`. Devices without memory
  statistics (CPU) share the host's available memory (`host_available_bytes`): each gets an
  equal part of it.
  """
  if not devices:
    raise ValueError("free_memory_bytes needs at least one device.")
  stats = [d.memory_stats() for d in devices]
  shared = sum(1 for s in stats if not s or "bytes_limit" not in s)
  host_share = host_available_bytes() // shared if shared else 0
  return min(host_share if not s or "bytes_limit" not in s
             else int(s["bytes_limit"]) - int(s.get("bytes_in_use", 0)) for s in stats)


def host_available_bytes() -> int:
  """Memory the host can still give this process: MemAvailable of /proc/meminfo (free pages by
  sysconf where there is none), capped by the cgroup's memory.max − memory.current if set."""
  available = _meminfo_available()
  if available is None:
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
  if limit is not None and used is not None:
    available = min(available, limit - used)
  return max(int(available), 0)


def _meminfo_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _read_int(path: str) -> int | None:
  """The integer in a one-line file, or None (missing, unreadable, or 'max')."""
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


def choose_on_every_process(compiled_bytes: Callable[[int], int], free_bytes: int,
                            candidates: Sequence[int], safety: float = 0.9) -> int:
  """`choose_microbatch_size` on every process, then the smallest choice of all processes.

  Every process must use the same microbatch size (the global batch is cut the same way
  everywhere); the smallest fits on every process, since memory grows with the size. A process
  on which nothing fits makes every process raise MicrobatchSizeError (none is left waiting).
  """
  error, size = None, 0
  try:
    size = choose_microbatch_size(compiled_bytes, free_bytes, candidates, safety)
  except MicrobatchSizeError as e:
    error = e
  agreed = min_over_processes(size)
  if agreed <= 0:
    raise error or MicrobatchSizeError(
        f"No microbatch size fits on another process of this job (process "
        f"{jax.process_index()} could use {size}); see that process's message. {_SET_IT}")
  return agreed


def min_over_processes(value: int) -> int:
  """The smallest of every process's `value` (itself in a single-process run)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.min(multihost_utils.process_allgather(np.int32(value))))
