"""Where a step's device time goes: a JAX profiler trace of a few steps, summed per kernel.

  summary = profile.kernel_times(run_steps, "/tmp/trace")  # {"track_ms", "kernels"}
  profile.annotate(summary["kernels"], dump_dir)  # with XLA_FLAGS=dump_flags(dump_dir) set

`jax.profiler.trace(..., create_perfetto_trace=True)` writes `perfetto_trace.json.gz`; its events
on the accelerator's tracks (process names mentioning a device, "/device:GPU:0" say) are grouped
by kernel name, with the HLO op and module of the first event; `annotate` adds what each kernel
computes from XLA's optimized-HLO dump (fusion names alone say little).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import re
from typing import Any, Callable

import jax


def dump_flags(dump_dir: str) -> str:
  """XLA_FLAGS that make XLA write each module's optimized HLO as text under `dump_dir` (set
  before jax starts; `annotate` reads them)."""
  return (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
          " --xla_dump_hlo_pass_re=^$").strip()


def annotate(kernels: list[dict], dump_dir: str) -> list[dict]:
  """Adds to each kernel the shape and the JAX op name (`source`) of the HLO instruction it runs,
  looked up by name (fusion_12 -> %fusion.12) in the optimized HLO that XLA dumped for the
  kernel's `module` (e.g. jit_accumulate; names repeat across modules)."""
  found: dict[tuple[str, str], str] = {}
  for path in pathlib.Path(dump_dir).glob("*after_optimizations.txt"):
    module = path.name.split(".")[1] if path.name.count(".") > 1 else ""
    for line in path.read_text().splitlines():
      match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", line)
      if match:
        found.setdefault((module, _key(match.group(1))), f"{match.group(2)} {match.group(3)}")
  for kernel in kernels:
    for name in (kernel["name"], kernel["hlo_op"]):
      key = (kernel.get("module", ""), _key(name))
      if key in found:
        kernel["source"] = found[key][:400]
        break
  return kernels


def _key(name: str) -> str:
  return name.replace(".", "_").replace("-", "_")


def kernel_times(run: Callable[[], Any], trace_dir: str, top: int = 40) -> dict:
  """Traces `run()` (which must block until its device work is done) and returns {"track_ms":
  {track: ms}, "kernels": [{track, name, ms, calls, hlo_op, module}, ...] (largest first, `top`
  of them)}: a track is a device thread of the trace ("Stream", "XLA Ops", "XLA Modules", ...);
  the same time shows on several of them."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run()
  events, device = _events(trace_dir)
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
      entry[3] = str(args.get("hlo_module", ""))
  kernels = [dict(track=track, name=name, ms=v[0], calls=v[1], hlo_op=v[2], module=v[3])
             for (track, name), v in sums.items()]
  kernels.sort(key=lambda k: -k["ms"])
  totals = collections.Counter()
  for k in kernels:
    totals[k["track"]] += k["ms"]
  return dict(track_ms=dict(totals), kernels=kernels[:top])


def host_event_times(trace_dir: str, top: int = 40) -> list[dict]:
  """[{name, ms, calls}, ...] (largest first, `top` of them): the host-side events of the trace
  under `trace_dir` (not on an accelerator's tracks: XLA's compile passes, say), summed by name.
  Events nest, so the sums overlap."""
  events, device = _events(trace_dir)
  sums: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") == "X" and e.get("pid") not in device and "dur" in e:
      sums[e["name"]][0] += e["dur"] / 1e3
      sums[e["name"]][1] += 1
  found = [dict(name=name, ms=v[0], calls=v[1]) for name, v in sums.items()]
  return sorted(found, key=lambda k: -k["ms"])[:top]


def _events(trace_dir: str) -> tuple[list[dict], set]:
  """(the events of the last perfetto trace under `trace_dir`, the pids of accelerator tracks:
  process names mentioning a device other than a CPU)."""
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
  return events, device
