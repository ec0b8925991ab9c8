"""Where a step's device time goes: a JAX profiler trace of a few steps, summed per kernel.

  summary = profile.kernel_times(lambda: run_steps(), "/tmp/trace")  # [(name, ms, calls), ...]

`jax.profiler.trace(..., create_perfetto_trace=True)` writes `perfetto_trace.json.gz`; its events
on the accelerator's tracks (process names mentioning a device, "/device:GPU:0" say) are grouped
by kernel name, with the HLO op and a shortened long name of the first event as a hint of what
the kernel computes (XLA fusion names alone say little).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
from typing import Any, Callable

import jax


def kernel_times(run: Callable[[], Any], trace_dir: str, top: int = 40) -> dict:
  """Traces `run()` (which must block until its device work is done) and returns {"track_ms":
  {track: ms}, "kernels": [{track, name, ms, calls, hlo_op, long_name}, ...] (largest first, `top`
  of them)}: a track is a device thread of the trace ("Stream", "XLA Ops", "XLA Modules", ...);
  the same time shows on several of them."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run()
  found = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(found[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in names.items() if "device" in name.lower()
            and "cpu" not in name.lower()}
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  sums: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0, "", ""])
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device or "dur" not in e:
      continue
    track = threads.get((e["pid"], e.get("tid")), "")
    entry = sums[(track.split("#")[0].strip(), e["name"])]
    entry[0] += e["dur"] / 1e3
    entry[1] += 1
    if not entry[2]:
      args = e.get("args", {})
      entry[2] = str(args.get("hlo_op", ""))
      entry[3] = str(args.get("long_name", args.get("hlo_module", "")))[:300]
  kernels = [dict(track=track, name=name, ms=v[0], calls=v[1], hlo_op=v[2], long_name=v[3])
             for (track, name), v in sums.items()]
  kernels.sort(key=lambda k: -k["ms"])
  totals = collections.Counter()
  for k in kernels:
    totals[k["track"]] += k["ms"]
  return dict(track_ms=dict(totals), kernels=kernels[:top])
