"""The one timing method of the benchmarks, for any framework: windows of steps dispatched without
synchronisation, one wait per window, the median over windows. No jax or torch import: dpjax's
harness waits with `jax.block_until_ready`, the PyTorch peers (`benchmarks/peers/`) with
`torch.cuda.synchronize`.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable


def time_calls(advance: Callable[[], Any], wait: Callable[[Any], Any], windows: int, steps: int,
               host: list[float] | None = None, warmup: int = 0) -> tuple[float, float]:
  """(seconds of the first call, median seconds per call).

  `advance()` dispatches one step and returns its output; `wait(output)` blocks until the device
  has finished it. The first call is timed alone (compilation, autotuning, allocation), then
  `warmup` more calls are made untimed, then each of `windows` windows dispatches `steps` steps
  and waits once. `host`, if given, receives each window's seconds per step spent dispatching
  (before the wait)."""
  if windows < 1 or steps < 1:
    raise ValueError(f"need windows >= 1 and steps >= 1 to time anything, got {windows=}, "
                     f"{steps=}.")
  start = time.perf_counter()
  wait(advance())
  first = time.perf_counter() - start
  for _ in range(warmup):
    out = advance()
  if warmup:
    wait(out)
  per_step = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      out = advance()
    if host is not None:
      host.append((time.perf_counter() - start) / steps)
    wait(out)
    per_step.append((time.perf_counter() - start) / steps)
  return first, statistics.median(per_step)


def max_rss_bytes() -> int:
  """This process's peak resident memory (the CPU's stand-in for a device allocator's peak)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
