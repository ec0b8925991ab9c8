"""The parent side of a peer benchmark: one configuration (mode × batch) per subprocess, its
measurement turned into rows of `benchmarks.schema`, a batch search that stops at the first
batch a mode runs out of memory with, and the fastest batch of each search marked as the plain
row.

A peer's subprocess prints one JSON dict (its "raw" measurement) as the last line of stdout, with
the keys `benchmarks.throughput` uses: model, dtype, batch, microbatch, microbatches, device,
method (None for a run of the non-private step alone), clip, details (the framework, its
versions, the settings), and per step "non_dp" / "dp": {step}_examples_per_s, _step_ms,
_dispatch_ms, _compile_s (the first step's extra seconds), _peak_memory_bytes. A run with "dp_*"
keys gives two rows (nondp, dp), one without gives the nondp row alone.

No jax or torch import: the parent never starts a backend.
"""

from __future__ import annotations

import argparse
from typing import Callable, Iterable, Mapping, Sequence

from benchmarks import rows as rows_lib
from benchmarks import schema

NOT_FASTEST = "batch search: not the fastest batch (batch {best} was)"
_OOM_MARKERS = ("out of memory", "resource_exhausted")


def is_out_of_memory(failed: str) -> bool:
  """Whether a failed configuration's exception line says it ran out of device memory (torch:
  OutOfMemoryError "CUDA out of memory"; XLA: RESOURCE_EXHAUSTED)."""
  return any(marker in failed.lower() for marker in _OOM_MARKERS)


def parse_batches(text: str) -> list[int]:
  """'32,64,128' -> [32, 64, 128] (sorted, each > 0); raises ValueError naming the bad entry."""
  try:
    batches = sorted({int(b) for b in text.split(",") if b.strip()})
  except ValueError:
    raise ValueError(f"--batches must be comma-separated integers, got {text!r}.") from None
  if not batches or batches[0] < 1:
    raise ValueError(f"--batches needs positive batch sizes, got {text!r}.")
  return batches


def configurations(modes: Sequence[str], batches: Sequence[int]) -> list[dict]:
  """Every (mode, batch), a mode's batches in increasing order (so its search can stop at the
  first that runs out of memory)."""
  return [dict(mode=mode, batch=batch) for mode in modes for batch in sorted(batches)]


def to_rows(raw: Mapping, *, benchmark: str, run: int, sources: tuple[str, str], command: str,
            commit: str | None, date: str | None, variant: Sequence[str] = ()) -> list[schema.Row]:
  """The rows of one configuration's measurement (see the module's docstring): its nondp row, and
  its dp row when it measured the DP step. `variant`: what differs from the script's plain run."""
  details = dict(raw["details"])
  nondp = schema.mode_fields(raw, "non_dp", sources[0], details)
  nondp.update(microbatch=raw["batch"])
  dp = None
  if "dp_examples_per_s" in raw:
    dp = schema.mode_fields(raw, "dp", sources[1], details)
    dp.update(microbatch=raw["microbatch"], microbatches=raw["microbatches"],
              method=raw["method"], clip=raw["clip"])
  shared = dict(benchmark=benchmark, model=raw["model"], dtype=raw["dtype"], mesh="1x1",
                device=raw["device"], commit=commit, date=date,
                variant="; ".join(variant) or None, command=command, run=run)
  return schema.pair_rows(shared, nondp, dp)


def mark_fastest(rows: Iterable[schema.Row]) -> list[schema.Row]:
  """`rows` with every run that is not the fastest of its search marked in `variant` (both of its
  rows), so that the plain row of a search is its fastest batch. A search is the runs that share
  benchmark, model, method, clip, dtype, device, variant and whether they timed the DP step;
  a run's speed is its dp row's examples/s, or its nondp row's when it has no dp row."""
  rows = [dict(row) for row in rows]
  runs: dict[int, list[dict]] = {}
  for row in rows:
    runs.setdefault(row["run"], []).append(row)
  searches: dict[tuple, list[tuple[float, int, list[dict]]]] = {}
  for pair in runs.values():
    timed = next((r for r in pair if r["mode"] == "dp"), pair[0])
    key = tuple(timed[k] for k in ("benchmark", "model", "method", "clip", "dtype", "device",
                                   "variant")) + (timed["mode"],)
    searches.setdefault(key, []).append((timed["examples_per_s"], timed["batch"], pair))
  for found in searches.values():
    _, best, _ = max(found, key=lambda f: f[0])
    for _, batch, pair in found:
      if batch != best:
        for row in pair:
          row["variant"] = "; ".join(filter(None, [row["variant"],
                                                   NOT_FASTEST.format(best=best)]))
  return [schema.validate(row) for row in rows]


def run_search(module: str, benchmark: str, configs: Sequence[dict],
               flags_of: Callable[[dict], list[str]], args: argparse.Namespace,
               variant: Sequence[str] = (),
               show: Callable[[list[schema.Row]], None] = lambda rows: None
               ) -> tuple[list[schema.Row], list[dict]]:
  """Runs each configuration as `python -m module *flags_of(config)`, writes the rows (fastest
  batch of each search plain, `mark_fastest`) and the failed configurations to `args.out` after
  each one, and returns them. Once a mode runs out of memory, its larger batches are not run
  (they are listed as failed, "skipped"). `show` receives each configuration's rows."""
  found = schema.provenance(args.commit)
  command = rows_lib.command(module)
  rows: list[schema.Row] = []
  failed: list[dict] = []
  out_of_memory: dict[str, int] = {}  # mode -> the smallest batch that ran out of memory
  for run, config in enumerate(configs):
    mode, batch = config["mode"], config["batch"]
    if mode in out_of_memory and batch > out_of_memory[mode]:
      failed.append(dict(config, failed=f"skipped: batch {out_of_memory[mode]} ran out of "
                                        "memory"))
    else:
      raw = rows_lib.run_row(module, flags_of(config), config)
      if "failed" in raw:
        failed.append(raw)
        if is_out_of_memory(raw["failed"]):
          out_of_memory[mode] = min(batch, out_of_memory.get(mode, batch))
      else:
        sources = tuple(f"{args.out or '-'}#/rows/{len(rows) + i}" for i in range(2))
        new = to_rows(raw, benchmark=benchmark, run=run, sources=sources, command=command,
                      variant=variant, **found)
        rows += new
        show(new)
    rows_lib.write_table(args.out, module, mark_fastest(rows), failed)
  return mark_fastest(rows), failed


def run_and_print(module: str, benchmark: str, configs: Sequence[dict],
                  flags_of: Callable[[dict], list[str]], args: argparse.Namespace,
                  variant: Sequence[str] = ()) -> None:
  """`run_search`, printing each configuration's line of `table.markdown` as it comes, then the
  whole table and the failed configurations."""
  from benchmarks.peers import table
  rows, failed = run_search(module, benchmark, configs, flags_of, args, variant,
                            show=lambda new: print(table.markdown(new).splitlines()[-1],
                                                   flush=True))
  print(table.markdown(rows))
  for config in failed:
    print(f"failed: {config}")


def add_flags(parser: argparse.ArgumentParser, batches: str, steps: int) -> None:
  """The flags every peer benchmark shares: the search, the timing and the output."""
  parser.add_argument("--batches", default=batches,
                      help="comma-separated batch sizes to search (each in its own process); a "
                           "mode stops at the first that runs out of memory")
  parser.add_argument("--dtype", default="bfloat16", choices=schema.DTYPES,
                      help="compute dtype (params and optimizer state stay float32)")
  parser.add_argument("--steps", type=int, default=steps, help="steps per timing window")
  parser.add_argument("--windows", type=int, default=3, help="timing windows (median)")
  parser.add_argument("--noise_multiplier", type=float, default=1.0)
  parser.add_argument("--clip_norm", type=float, default=1.0, help="flat clipping norm C")
  parser.add_argument("--out", default="", help="JSON file of benchmarks.schema rows")
  parser.add_argument("--commit", default="",
                      help="the dpjax commit measured (default: git's HEAD; needed where no "
                           ".git is)")
  parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)  # internal


def common_flags(args: argparse.Namespace) -> list[str]:
  """The shared flags a subprocess receives (everything `add_flags` defines but the search)."""
  return [f"--dtype={args.dtype}", f"--steps={args.steps}", f"--windows={args.windows}",
          f"--noise_multiplier={args.noise_multiplier}", f"--clip_norm={args.clip_norm}"]
