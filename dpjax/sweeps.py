"""Sweeps: variants of one experiment from axes of config overrides, their commands, local runs,
a results table and plots. The command line is `launch/sweep.py`.

A sweep workdir holds one folder per variant, named after its swept values
(`switch_step=100,target_epsilon=3`), with the run's own files (results.json, metrics.jsonl, ...)
and `variant.json`, the overrides it was launched with.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Iterable

from dpjax import report


class SweepError(RuntimeError):
  """A variant failed; the message names it and says how to resume."""


def expand(sweeps: list[str]) -> list[dict[str, str]]:
  """The cartesian product of axes such as "mixing.switch_step=0,100,200", one dict per variant."""
  axes = {}
  for spec in sweeps:
    key, _, values = spec.partition("=")
    if not key or not values or key in axes:
      raise ValueError(f"Bad sweep {spec!r}: write KEY=V1,V2,... (e.g. mixing.switch_step=0,100), "
                       "each KEY once.")
    axes[key] = values.split(",")
  return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def variant_name(variant: dict[str, str]) -> str:
  """A filesystem-safe folder name from the values, keyed by the last part of each key."""
  short = {k: k.rsplit(".", 1)[-1] for k in variant}
  if len(set(short.values())) < len(short):  # e.g. a.lr and b.lr: keep the full keys
    short = {k: k for k in variant}
  name = ",".join(f"{short[k]}={v}" for k, v in variant.items()) or "base"
  return re.sub(r"[^\w.,=+-]", "_", name)


_PLACEHOLDER = re.compile(r"\{([\w.]+)\}")


def fill(flag: str, variant: dict[str, str]) -> str:
  """`flag` with each {KEY} replaced by the variant's value of the swept KEY, named in full
  ({dp.target_epsilon}) or by its last part ({seed}, {target_epsilon}) when no other swept key
  ends the same: e.g. --config.finetune.init_from=W/pretrain/seed={seed} starts each seed's
  fine-tuning from the pre-training of the same seed. Raises ValueError for a KEY not swept."""
  short: dict[str, list[str]] = {}
  for key in variant:
    short.setdefault(key.rsplit(".", 1)[-1], []).append(key)

  def value(match: re.Match) -> str:
    key = match.group(1)
    if key in variant:
      return variant[key]
    if len(short.get(key, ())) == 1:
      return variant[short[key][0]]
    raise ValueError(f"{flag!r} names {{{key}}}, which is not one swept key (swept: "
                     f"{sorted(variant) or 'none'}); write {{KEY}} with a key of a --sweep axis, "
                     "in full where two keys end the same.")
  return _PLACEHOLDER.sub(value, flag)


def commands(config: str, workdir: str, variants: list[dict[str, str]],
             extra_flags: Iterable[str] = (), prefix: str = "") -> list[list[str]]:
  """One `python -m dpjax.main` argv per variant, in `workdir/<prefix,variant name>`; {KEY} in
  `extra_flags` is the variant's value of the swept KEY (`fill`)."""
  names = [variant_name(v) for v in variants]
  extra_flags = list(extra_flags)  # read once per variant
  if prefix:
    names = [re.sub(r"[^\w.,=+-]", "_", prefix) + ("," + n if v else "")
             for n, v in zip(names, variants)]
  if len(set(names)) < len(names):
    raise ValueError(f"Two variants share a folder name: {names}; use values that differ in "
                     "letters, digits or . , = + -.")
  return [["python", "-m", "dpjax.main", f"--config={config}",
           f"--workdir={os.path.join(workdir, name)}",
           *[f"--config.{k}={v}" for k, v in variant.items()],
           *[fill(flag, variant) for flag in extra_flags]]
          for name, variant in zip(names, variants)]


def _workdir(cmd: list[str]) -> str:
  return next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))


def _done(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "results.json"))


def write_variants(config: str, cmds: list[list[str]], variants: list[dict[str, str]]) -> None:
  """Saves each unfinished variant's overrides and command as `variant.json` in its workdir."""
  for cmd, variant in zip(cmds, variants):
    if _done(_workdir(cmd)):
      continue
    os.makedirs(_workdir(cmd), exist_ok=True)
    with open(os.path.join(_workdir(cmd), "variant.json"), "w") as f:
      json.dump(dict(config=config, overrides=variant, command=shlex.join(cmd)), f, indent=2)


def run_local(cmds: list[list[str]], capture: bool = False, parallel: int = 1,
              start_before: float | None = None) -> list[str]:
  """Runs the commands with this interpreter (cmd[0] is replaced), `parallel` at a time.

  A variant whose workdir has results.json is skipped, and one with checkpoints resumes, so
  rerunning a sweep finishes it. With parallel > 1 each run's output goes to WORKDIR.log beside
  its workdir and each run may take 1/parallel of the accelerator's memory
  (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set). `start_before` (a `time.time()`): no run starts
  after it, so that a device call whose limit is known ends with finished runs, not cut ones; the
  runs already started finish. Returns the names of the variants not started for it. Raises
  SweepError naming the first variant that fails (after the runs already started have ended).
  """
  if parallel < 1:
    raise ValueError(f"parallel must be >= 1, got {parallel}.")
  env = dict(os.environ)
  if parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.3f}")
  running, failed, not_started = [], [], []
  def wait_one():  # for whichever run ends first (runs of one sweep differ in length)
    # Runs in parallel write to log files, so polling them cannot block on a full pipe; a single
    # run is waited for with communicate, which drains its pipes (capture).
    while len(running) > 1 and not any(r[0].poll() is not None for r in running):
      time.sleep(0.2)
    proc, name, cmd, log = running.pop(next(
        (i for i, r in enumerate(running) if r[0].poll() is not None), 0))
    stdout, stderr = proc.communicate()
    output = ""
    if log is not None:
      log.close()
      with open(log.name) as f:
        output = f.read()[-3000:]
    elif capture:
      output = (stdout + stderr)[-3000:]
    if proc.returncode:
      failed.append((name, cmd, proc.returncode, output or "(output above)"))
    elif parallel > 1:
      print(f"{name}: finished", flush=True)
  for i, cmd in enumerate(cmds, 1):
    workdir = _workdir(cmd)
    name = os.path.basename(workdir)
    if _done(workdir):
      print(f"[{i}/{len(cmds)}] {name}: done already (results.json), skipped", flush=True)
      continue
    if failed:
      break
    while len(running) >= parallel:
      wait_one()
    if start_before is not None and time.time() >= start_before:
      print(f"[{i}/{len(cmds)}] {name}: not started (past --start_before)", flush=True)
      not_started.append(name)
      continue
    print(f"[{i}/{len(cmds)}] {name}: {shlex.join(cmd)}", flush=True)
    log = None
    if parallel > 1:
      os.makedirs(os.path.dirname(workdir) or ".", exist_ok=True)
      log = open(workdir + ".log", "a")
      streams = dict(stdout=log, stderr=subprocess.STDOUT)
    else:
      streams = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE) if capture else {}
    proc = subprocess.Popen([sys.executable, *cmd[1:]], text=True, env=env, **streams)
    running.append((proc, name, cmd, log))
    if parallel == 1:
      wait_one()
  while running:
    wait_one()
  if failed:
    name, cmd, code, output = failed[0]
    raise SweepError(f"Variant {name} failed with exit code {code}:\n{output}\n"
                     f"Command: {shlex.join(cmd)}\nFix it and rerun the sweep: finished "
                     "variants are skipped, this one resumes from its checkpoints.")
  return not_started


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def _number(value: str):
  for kind in (int, float):
    try:
      return kind(value)
    except ValueError:
      pass
  return value


def _natural(name: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def collect(workdir: str) -> list[dict]:
  """One flat row per finished variant: variant, workdir, swept values (numbers where they parse),
  then results.json with nested keys joined by dots (privacy.epsilon, ...)."""
  rows = []
  for path in sorted(glob.glob(os.path.join(workdir, "*", "results.json"))):
    run = os.path.dirname(path)
    overrides = {}
    if os.path.exists(os.path.join(run, "variant.json")):
      with open(os.path.join(run, "variant.json")) as f:
        overrides = {k: _number(v) for k, v in json.load(f)["overrides"].items()}
    row = dict(variant=os.path.basename(run), workdir=run, **overrides)
    # A result that repeats a swept key (e.g. finetune.selection) keeps the override's value.
    row.update({k: v for k, v in _flatten(report.load_results(run)).items() if k not in row})
    rows.append(row)
  return sorted(rows, key=lambda r: _natural(r["variant"]))


def write_csv(rows: list[dict], path: str) -> None:
  """All rows' keys as columns (in order of first appearance); missing values are left empty."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)


def figure(num_axes: int = 1):
  """(Figure, axes [num_axes]) in rows of up to 3, for writing PNGs with fig.savefig."""
  # matplotlib's Figure (not pyplot) writes PNGs with the Agg canvas and leaves the global backend
  # alone; imported here so that expanding and printing commands stays fast.
  from matplotlib.figure import Figure
  cols = min(num_axes, 3)
  fig = Figure(figsize=(5.5 * cols, 4 * math.ceil(num_axes / cols)), layout="constrained")
  return fig, fig.subplots(math.ceil(num_axes / cols), cols, squeeze=False).ravel()


def plot_accuracy(rows: list[dict], x_key: str, group_key: str | None, path: str,
                  baselines: dict[str, float] | None = None) -> None:
  """Test accuracy against `x_key`, one line per value of `group_key`, baselines as h-lines."""
  groups = {}
  for row in rows:
    if x_key in row:
      groups.setdefault(row.get(group_key) if group_key else None, []).append(row)
  if not groups:
    raise ValueError(f"No finished variant has {x_key!r}; choose one of the swept keys.")
  fig, (ax,) = figure()
  for group, members in groups.items():
    members.sort(key=lambda r: r[x_key])
    ax.plot([r[x_key] for r in members], [r["test_accuracy"] for r in members], marker="o",
            label=None if group_key is None else f"{group_key} = {group}")
  for i, (name, accuracy) in enumerate((baselines or {}).items()):
    ax.axhline(accuracy, linestyle="--", color=f"C{len(groups) + i}",
               label=f"{name} ({accuracy:.4f})")
  ax.set(xlabel=x_key, ylabel="test accuracy", title=f"test accuracy vs {x_key}")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.savefig(path)


def plot_curves(workdir_or_rows: str | list[dict], keys: list[str] | None, path: str) -> bool:
  """Curvature records (kind "curvature") against step, one line per variant, one panel per key.

  keys=None plots every numeric key found. Log y where all of a key's values are > 0. Writes
  nothing and returns False when no variant has curvature records.
  """
  from dpjax.train import metrics  # imported here: dpjax.train pulls in jax
  rows = collect(workdir_or_rows) if isinstance(workdir_or_rows, str) else workdir_or_rows
  curves = {}
  for row in rows:
    if os.path.exists(os.path.join(row["workdir"], "metrics.jsonl")):
      records = [r for r in metrics.read_metrics(row["workdir"]) if r["kind"] == "curvature"]
      if records:
        curves[row["variant"]] = records
  numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  found = sorted({k for recs in curves.values() for r in recs for k, v in r.items()
                  if numeric(v) and k != "step"})
  keys = [k for k in (found if keys is None else keys) if k in found]
  if not keys:
    return False
  fig, axes = figure(len(keys))
  for ax, key in zip(axes, keys):
    values = []
    for variant, records in curves.items():
      points = [(r["step"], r[key]) for r in records if numeric(r.get(key))]
      if points:
        ax.plot(*zip(*points), marker=".", label=variant)
        values += [v for _, v in points]
    if min(values) > 0:
      ax.set_yscale("log")
    ax.set(xlabel="step", title=key)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  fig.savefig(path)
  return True
