"""The real training loop's DP examples/s on 1, 2, 4, 8 devices, and its scaling efficiency.

Where `benchmarks.scaling` times the jitted steps on synthetic arrays, this times the trainer
itself (`dpjax.train.loop.Trainer`, the host loop of every run) on cifar10_jpeg: each step's
Poisson batch drawn by the plan's sampler, its records read, JPEG-decoded and standardised by the
streaming grain pipeline (`--workers` processes), split over the mesh, then the DP step (ghost
clipping by default, bfloat16, flat clipping, noise σ = 1, Adam). All of the training set is
private; α = 0 throughout. The non-DP row is the same trainer with all data public (α = 1), one
public batch of a DP microbatch's size per step.

Images: cifar10_jpeg is 32×32. The 224² ViTs (`vit_b16_224`, `vit_l16_224`) get the ViT's
`input_resize`: the host reads and sends the 32² images and the model resizes each to 224²
(bilinear) on the device as its first operation, inside the timed step (a few MFLOPs per image
against ~17.5 GFLOPs for ViT-B/16's forward pass). The smaller models take the 32² images as
they are.

Weak scaling: every device gets `--microbatch` rows of each microbatch and `--microbatches`
microbatches' worth of expected batch, so the global expected batch is microbatch ×
microbatches × devices and the global microbatch microbatch × devices. Timing: after `--warmup`
steps (compilation, the pipeline's start), the params are waited for at the end of every window of
`--window` steps; a window's rate is the private examples its steps really drew (the realised
Poisson batch sizes, not the padding) over its seconds; the row's examples/s is the median over
windows. The run's mechanism seed is `dp.insecure_reproducible_seed` (a benchmark: the batch sizes
it reports are then functions of a public seed, not of a secret). Scaling efficiency = examples/s
÷ (devices × the examples/s of the call's 1x1 layout).

Each layout runs in its own subprocess that sees only its devices (CUDA_VISIBLE_DEVICES on GPU,
the virtual device count on CPU). A layout `DATAxFSDP/P` runs as P processes of
devices/P devices each, one jax.distributed job through `launch/multiprocess.py`;
`--processes N` does so for every layout of N devices (one process per device).

  python -m benchmarks.scaling_trainer --model vit_b16_224 --layouts 1x1,2x1,4x1,8x1 \\
      --out $OUT/st.json --commit C                                  # GPU, 8 devices
  python -m benchmarks.scaling_trainer --platform cpu --model vit_test --microbatch 4 \\
      --microbatches 2 --warmup 2 --window 2 --windows 2 --workers 0 --layouts 1x1,2x1,4x1,8x1,2x1/2
                                                                     # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

from benchmarks import rows as rows_lib
from benchmarks import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW_PREFIX = "SCALING_TRAINER_ROW "  # the line a layout's process 0 prints its measurement on


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh DATAxFSDP run as `processes` jax processes (devices split evenly among them)."""
  data: int
  fsdp: int
  processes: int = 1

  @property
  def devices(self) -> int:
    return self.data * self.fsdp

  @property
  def name(self) -> str:
    return f"{self.data}x{self.fsdp}" + (f"/{self.processes}" if self.processes > 1 else "")


def parse_layout(token: str, processes: int = 0) -> Layout:
  """'DATAxFSDP' or 'DATAxFSDP/P'; without /P, `processes` (> 0) processes when the layout has
  exactly that many devices (one process per device), else one process."""
  mesh, _, count = token.strip().partition("/")
  try:
    data, fsdp = (int(x) for x in mesh.split("x"))
    layout = Layout(data, fsdp, int(count) if count else 1)
  except ValueError:
    raise SystemExit(f"layout {token!r} is not DATAxFSDP or DATAxFSDP/PROCESSES, e.g. 2x4 or "
                     "8x1/8.") from None
  if not count and processes > 1 and layout.devices == processes:
    layout = dataclasses.replace(layout, processes=processes)
  if min(layout.data, layout.fsdp, layout.processes) < 1 or layout.devices % layout.processes:
    raise SystemExit(f"layout {token!r}: the processes must divide the {layout.devices} devices.")
  return layout


# ------------------------------------------------------------------------------------------------
# One layout, in its own process(es)


def config_for(args: argparse.Namespace, layout: Layout, private: bool):
  """The trainer's config for one layout: the DP run (private) or its non-DP counterpart."""
  from benchmarks import harness
  from dpjax import config as config_lib
  c = config_lib.default_config()
  model = dict(harness.MODELS[args.model][0])
  if model.get("image_size", 32) != 32:
    model["input_resize"] = True  # cifar10_jpeg's 32² images, resized on the device
  c.model.update(model)
  c.data.update(name="cifar10_jpeg", standardize=True, workers=args.workers,
                threads=args.threads, in_memory=args.in_memory, augment=args.augment,
                public_fraction=0.0 if private else 1.0, verify=not args.data_dir)
  if args.data_dir:
    c.data.dir = args.data_dir
  devices = layout.devices
  c.dp.update(clip="flat", clip_norm=1.0, noise_multiplier=1.0, target_epsilon=None,
              delta=1e-5, expected_batch_size=args.microbatch * args.microbatches * devices,
              insecure_reproducible_seed=0)
  c.mixing.update(schedule="constant", alpha=0.0 if private else 1.0)
  c.optimizer.update(name="adam", learning_rate=1e-4)
  c.schedule.update(total_steps=args.warmup + args.window * args.windows,
                    public_batch_size=args.microbatch * devices)
  c.perf.update(microbatch_size=args.microbatch * devices, per_example_method=args.method,
                dtype=args.dtype)
  c.mesh.update(data=layout.data, fsdp=layout.fsdp)
  c.eval.every_steps = c.checkpoint.every_steps = 10**9
  return c


def time_trainer(config, warmup: int, window: int) -> dict[str, Any]:
  """Runs the trainer of `config` and times its windows of `window` steps after `warmup` steps.

  Returns the windows' (steps, seconds, examples, padded rows), the seconds of building the
  trainer (data, model, checks) and of the warm-up steps. No checkpoint, no final evaluation."""
  import jax

  from dpjax import config as config_lib
  from dpjax.train import hooks, host_loop, loop

  marks: list[tuple[int, float]] = []

  class Clock(hooks.BaseHook):
    name = "benchmark_clock"

    def after_step(self, run, done):
      if done >= warmup and (done - warmup) % window == 0:
        jax.block_until_ready(run.state.params)
        marks.append((done, time.perf_counter()))

  class Timed(loop.Trainer):
    def finish(self, done, stopped, seconds):
      self.writer.close()
      return dict(steps=done, stopped=stopped or "completed")

  began = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    run = host_loop.RunConfig(config, config_lib.validate(config), workdir)
    trainer = Timed(loop.build_inputs(run))
    built = time.perf_counter()
    trainer.hooks.append(Clock())
    trainer.run(show_progress=False)
  rows = step_rows(trainer, config)
  windows = [dict(steps=b - a, seconds=t1 - t0, examples=sum(r for r, _ in rows[a:b]),
                  padded=sum(p for _, p in rows[a:b]))
             for (a, t0), (b, t1) in zip(marks, marks[1:])]
  return dict(windows=windows, build_s=built - began, warmup_s=marks[0][1] - built,
              microbatch_size=trainer.microbatch_size())


def step_rows(trainer, config) -> list[tuple[int, int]]:
  """(real examples, rows computed) of each step: the Poisson sampler's realised batch and its
  padding to whole microbatches (DP), or the public batch (non-DP)."""
  steps = range(config.schedule.total_steps)
  if trainer.sampler is None:
    return [(config.schedule.public_batch_size,) * 2 for _ in steps]
  m = trainer.sampler.microbatch_size
  return [(n, -(-n // m) * m) for n in (len(trainer.sampler.indices(t)) for t in steps)]


def summary(timed: Mapping[str, Any]) -> dict[str, Any]:
  """Examples/s (median over windows), step ms, the windows' spread, padding: from `time_trainer`."""
  windows = timed["windows"]
  rates = [w["examples"] / w["seconds"] for w in windows]
  steps = sum(w["steps"] for w in windows)
  seconds = sum(w["seconds"] for w in windows)
  examples = sum(w["examples"] for w in windows)
  return dict(examples_per_s=statistics.median(rates), spread=[min(rates), max(rates)],
              overall_examples_per_s=examples / seconds, step_ms=1e3 * seconds / steps,
              padding=1 - examples / sum(w["padded"] for w in windows),
              examples_per_step=examples / steps, build_s=timed["build_s"],
              warmup_s=timed["warmup_s"], timed_steps=steps)


def local_peak_memory_bytes() -> int:
  """The largest allocator peak over this process's devices; its max RSS on CPU."""
  import jax

  from benchmarks import timing
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  return timing.max_rss_bytes() if None in peaks else int(max(peaks))


def run_one(args: argparse.Namespace, layout: Layout) -> dict[str, Any] | None:
  """Times the non-DP trainer, then the DP one, on this process's share of `layout`; returns the
  measurement on process 0 (None on the others)."""
  from dpjax import parallel
  parallel.initialize_distributed()  # a no-op unless launch/multiprocess.py started us
  import jax

  from benchmarks import harness
  if jax.device_count() != layout.devices:
    raise SystemExit(f"layout {layout.name} needs {layout.devices} devices; this job sees "
                     f"{jax.device_count()}.")
  result = dict(model=args.model, data=layout.data, fsdp=layout.fsdp, devices=layout.devices,
                processes=jax.process_count(), dtype=args.dtype, method=args.method,
                per_device=args.microbatch, microbatches=args.microbatches,
                expected_batch=args.microbatch * args.microbatches * layout.devices,
                workers=args.workers, in_memory=args.in_memory, augment=args.augment)
  # Non-DP first: the allocator's peak after it is its own; after the DP trainer, the overall
  # peak is the DP trainer's whenever that is the larger (peaks only grow).
  for name, private in (("non_dp", False), ("dp", True)):
    timed = time_trainer(config_for(args, layout, private), args.warmup, args.window)
    result.update({f"{name}_{k}": v for k, v in summary(timed).items()},
                  **{f"{name}_peak_memory_bytes": local_peak_memory_bytes(),
                     f"{name}_microbatch": timed["microbatch_size"]})
  result.update(harness.device_facts())
  return result if parallel.is_main_process() else None


# ------------------------------------------------------------------------------------------------
# The parent: one subprocess (or one job of processes) per layout


def layout_command(layout: Layout, flags: list[str], platform: str) -> tuple[list[str], dict]:
  """The command and environment that run `layout` (`--one`) on its devices only."""
  one = [sys.executable, "-m", "benchmarks.scaling_trainer", "--one", layout.name] + flags
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])))
  per_process = layout.devices // layout.processes
  if layout.processes > 1:  # launch/multiprocess.py gives each process its devices
    return [sys.executable, str(ROOT / "launch" / "multiprocess.py"),
            f"--num_processes={layout.processes}", f"--devices_per_process={per_process}",
            f"--platform={platform}", "--"] + one, env
  if platform == "cpu":
    from launch import multiprocess
    env = multiprocess.process_env(0, 1, 0, per_process, "cpu")
    for key in ("DPJAX_COORDINATOR_ADDRESS", "DPJAX_NUM_PROCESSES", "DPJAX_PROCESS_ID"):
      env.pop(key)
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(per_process)))
  return one, env


def measure_layout(layout: Layout, flags: list[str], platform: str) -> dict[str, Any]:
  """Runs one layout; returns its measurement, or {layout, failed} with the error line."""
  command, env = layout_command(layout, flags, platform)
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
  found = [line.split(ROW_PREFIX, 1)[1] for line in done.stdout.splitlines()
           if ROW_PREFIX in line]
  if done.returncode or not found:
    print(f"FAILED {layout.name}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}",
          file=sys.stderr)
    return dict(layout=layout.name, failed=rows_lib.failure(done.stderr or done.stdout))
  return json.loads(found[-1])


def add_efficiency(measured: list[dict]) -> None:
  """Sets each measurement's scaling efficiency: examples/s ÷ (devices × the 1x1 layout's), for
  the DP and the non-DP trainer (None without a 1x1 layout in the call)."""
  one = next((m for m in measured if m["devices"] == 1 and m["processes"] == 1), None)
  for m in measured:
    for name in ("dp", "non_dp"):
      m[f"{name}_efficiency"] = (None if one is None else m[f"{name}_examples_per_s"]
                                 / (m["devices"] * one[f"{name}_examples_per_s"]))


DETAILS = ("devices", "processes", "per_device", "expected_batch", "workers", "in_memory",
           "augment", "jax", "platform")
MODE_DETAILS = ("spread", "overall_examples_per_s", "padding", "examples_per_step", "build_s",
                "warmup_s", "timed_steps", "efficiency")


def to_rows(raw: Mapping, *, run: int, sources: tuple[str, str], command: str,
            commit: str | None, date: str | None, variant: Sequence[str] = ()
            ) -> list[schema.Row]:
  """The nondp and dp `schema.Row`s of one layout's measurement (`run_one`'s dict). The dp row's
  microbatch is global (per device × devices) and its microbatches the expected batch's; compile
  time is not separated from the warm-up (details: warmup_s). A layout of several processes
  carries the variant "P processes"."""
  details = {k: raw[k] for k in DETAILS if k in raw}
  nondp = schema.mode_fields(raw, "non_dp", sources[0], details, MODE_DETAILS)
  nondp.update(microbatch=raw["non_dp_microbatch"], compile_s=None)
  dp = schema.mode_fields(raw, "dp", sources[1], details, MODE_DETAILS)
  dp.update(microbatch=raw["dp_microbatch"], microbatches=raw["microbatches"],
            method=raw["method"], clip="flat", compile_s=None)
  processes = [f"{raw['processes']} processes"] if raw["processes"] > 1 else []
  shared = dict(benchmark="scaling_trainer", model=raw["model"], dtype=raw["dtype"],
                mesh=f"{raw['data']}x{raw['fsdp']}", device=raw["device"], commit=commit,
                date=date, variant="; ".join(list(variant) + processes) or None,
                command=command, run=run)
  return schema.pair_rows(shared, nondp, dp)


def print_table(measured: list[dict]) -> None:
  print(f"{'layout':<14} {'exp. batch':>10} {'DP ex/s':>9} {'spread':>17} {'step ms':>8} "
        f"{'efficiency':>10} {'padding':>8} {'non-DP ex/s':>11} {'non-DP eff.':>11} "
        f"{'peak MiB/dev':>12} device")
  fmt = lambda x: "—" if x is None else f"{x:.3f}"
  for m in measured:
    name = f"{m['data']}x{m['fsdp']}" + (f"/{m['processes']}p" if m["processes"] > 1 else "")
    low, high = m["dp_spread"]
    print(f"{name:<14} {m['expected_batch']:>10} {m['dp_examples_per_s']:>9.1f} "
          f"{f'{low:.1f}–{high:.1f}':>17} {m['dp_step_ms']:>8.1f} {fmt(m['dp_efficiency']):>10} "
          f"{m['dp_padding']:>8.3f} {m['non_dp_examples_per_s']:>11.1f} "
          f"{fmt(m['non_dp_efficiency']):>11} {m['dp_peak_memory_bytes'] / 2**20:>12.0f} "
          f"{m['device']}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="vit_b16_224")
  parser.add_argument("--layouts", default="1x1,2x1,4x1,8x1",
                      help="comma-separated DATAxFSDP[/PROCESSES], e.g. 1x1,8x1,1x8,2x4,8x1/8")
  parser.add_argument("--processes", type=int, default=0,
                      help="run every layout of exactly N devices as N processes of one device")
  parser.add_argument("--platform", choices=("gpu", "cpu"), default="gpu")
  parser.add_argument("--microbatch", type=int, default=128, help="rows per device per "
                      "microbatch")
  parser.add_argument("--microbatches", type=int, default=4,
                      help="expected batch per device, in microbatches")
  parser.add_argument("--method", default="ghost", choices=("ghost", "vmap"))
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles)")
  parser.add_argument("--window", type=int, default=10, help="steps per timing window")
  parser.add_argument("--windows", type=int, default=3)
  parser.add_argument("--workers", type=int, default=8, help="grain worker processes, per "
                      "jax process")
  parser.add_argument("--threads", type=int, default=4)
  parser.add_argument("--in_memory", action="store_true",
                      help="decode the dataset into memory first (no JPEG decoding per step)")
  parser.add_argument("--augment", default="none", help="data.augment, e.g. crop_flip")
  parser.add_argument("--data_dir", default="",
                      help="a folder holding cifar10-jpeg/ (default $DPJAX_DATA_DIR); given, "
                           "its archive's checksum is not verified (test data)")
  rows_lib.add_output_flags(parser)
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # a layout, internal
  args = parser.parse_args()
  if args.one:
    found = run_one(args, parse_layout(args.one))
    if found is not None:
      print(ROW_PREFIX + json.dumps(found), flush=True)
    return
  layouts = [parse_layout(t, args.processes) for t in args.layouts.split(",")]
  passthrough = [f"--{k}={v}" for k, v in vars(args).items()
                 if k not in ("out", "layouts", "one", "commit", "processes", "platform",
                              "in_memory")]
  passthrough += ["--in_memory"] if args.in_memory else []
  found = schema.provenance(args.commit)
  measured, failed = [], []
  for layout in layouts:
    m = measure_layout(layout, passthrough, args.platform)
    (failed if "failed" in m else measured).append(m)
    add_efficiency(measured)
    rows = []
    for run, raw in enumerate(measured):
      sources = tuple(f"{args.out or '-'}#/rows/{2 * run + i}" for i in range(2))
      rows += to_rows(raw, run=run, sources=sources,
                      command=rows_lib.command("benchmarks.scaling_trainer"),
                      variant=rows_lib.environment_variant(), **found)
    rows_lib.write_table(args.out, "benchmarks.scaling_trainer", rows, failed)
  if measured:
    print_table(measured)
  if failed:
    raise SystemExit(f"layouts failed: {[f['layout'] for f in failed]}")


if __name__ == "__main__":
  main()
