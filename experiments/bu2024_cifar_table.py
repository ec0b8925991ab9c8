"""Tabulates the cifar10_jpeg study of Bu et al. (2024): mean ± std over seeds per cell, a figure.

  python experiments/bu2024_cifar_table.py RUNS_DIR [--out DIR]

RUNS_DIR holds the sweep folders of `experiments/bu2024_cifar.sh` (REGIME_PART/<variant>/ for the
WRN, REGIME_PART_MODEL/<variant>/ for another model, with results.json and variant.json). Writes
DIR/cells.csv (one row per cell), DIR/runs.csv (one row per run) and DIR/accuracy_REGIME.png
(accuracy_REGIME_MODEL.png for a model other than the WRN: test accuracy against the switch step,
one line per ε, the baselines as lines), and prints the markdown table.
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import json
import math
import os
import re
import statistics

DEFAULT_TARGET_EPSILON = 8.0  # experiments/bu2024_cifar.py's dp.target_epsilon
DEFAULT_MODEL = "wrn"  # experiments/bu2024_cifar.py's default model: its figures have no suffix
# bu2024_cifar.sh's automatic-switch parts other than R_auto (REGIME_PART folders): their variant
AUTO_PARTS = dict(plateau="auto_plateau", accplateau="auto_accplateau",
                  relplateau="auto_relplateau", lookahead="auto_lookahead",
                  autowindow="auto_window")
DP_VARIANTS = ("dp", "auto") + tuple(AUTO_PARTS.values())


def _warmup_steps(results: dict, variant: dict) -> int:
  """The run's lr warm-up: from the config results.json records, else from the command line
  (runs that ran before results.json recorded the config had an experiment default of 0)."""
  if "config" in results:
    return int(results["config"]["schedule"]["warmup_steps"])
  given = re.search(r"--config\.schedule\.warmup_steps=(\d+)", variant.get("command", ""))
  return int(given.group(1)) if given else 0


def _augmult(results: dict, overrides: dict) -> int:
  """The run's augmentation multiplicity K (dp.augmult): swept, else from the config results.json
  records, else 1 (the experiment's value before K was swept)."""
  if "dp.augmult" in overrides:
    return int(overrides["dp.augmult"])
  return int(results.get("config", {}).get("dp", {}).get("augmult", 1))


def _target_epsilon(results: dict, overrides: dict, kind: str) -> float | None:
  if "dp.target_epsilon" in overrides:
    return float(overrides["dp.target_epsilon"])
  if kind not in DP_VARIANTS:
    return None
  if "config" in results:
    return results["config"]["dp"]["target_epsilon"]
  return DEFAULT_TARGET_EPSILON


def fired_by(results: dict) -> str | None:
  """What decided an automatic switch: "criterion", "cap" (max_switch_step alone) or "criterion
  and cap" (both at one check), from the plan change the privacy statement records; None if no
  plan changed (fixed switches, baselines)."""
  changes = results["privacy"].get("plan_changes") or []
  if not changes:
    return None
  reasons = changes[0]["reason"].split("; ")
  cap = [r for r in reasons if r.startswith("reached max_switch_step")]
  if not cap:
    return "criterion"
  return "cap" if len(reasons) == len(cap) else "criterion and cap"


def run_rows(runs_dir: str) -> list[dict]:
  """One dict per finished run: regime, variant, switch step, ε target, seed, accuracy, ε spent."""
  rows = []
  for results in sorted(glob.glob(os.path.join(runs_dir, "*", "*", "results.json"))):
    folder = os.path.dirname(results)
    variant = json.load(open(os.path.join(folder, "variant.json")))
    r = json.load(open(results))
    config_arg = variant["config"].partition(":")[2].split(",")
    overrides = variant["overrides"]
    part = os.path.basename(os.path.dirname(folder))
    kind = config_arg[0]
    # REGIME_PART or REGIME_PART_MODEL: PART names the criterion of an automatic part
    kind = AUTO_PARTS.get(part.partition("_")[2].partition("_")[0], kind)
    privacy = r["privacy"]
    rows.append(dict(
        regime=config_arg[1], model=config_arg[2], variant=kind,
        switch_step=r.get("switch_step") if kind.startswith("auto") else
        (int(overrides["mixing.switch_step"]) if "mixing.switch_step" in overrides else None),
        switch_fired_by=fired_by(r) if kind.startswith("auto") else None,
        max_switch_step=int(overrides["mixing.auto.max_switch_step"])
        if "mixing.auto.max_switch_step" in overrides else None,
        target_epsilon=_target_epsilon(r, overrides, kind),
        warmup_steps=_warmup_steps(r, variant) if kind in DP_VARIANTS else None,
        augmult=_augmult(r, overrides),
        seed=int(overrides["seed"]), test_accuracy=r["test_accuracy"],
        epsilon=privacy.get("epsilon"), private_steps=privacy.get("private_steps"),
        noise_multiplier=privacy.get("noise_multiplier"), train_seconds=r["train_seconds"],
        run=os.path.relpath(folder, runs_dir)))
  return rows


def cell_name(row: dict) -> str:
  """The variant, with the switch step for fixed switches, the warm-up when there is none and the
  augmentation multiplicity K when it is not 1."""
  name = row["variant"]
  if name == "dp":
    name = "private_only (switch 0)" if row["switch_step"] == 0 else f"switch {row['switch_step']}"
  if row.get("max_switch_step") is not None:
    name += f", cap {row['max_switch_step']}"
  if row["augmult"] != 1:
    name += f", K = {row['augmult']}"
  if row["warmup_steps"] == 0 and row["variant"] in DP_VARIANTS:
    name += ", no warm-up"
  return name


def accuracy_summary(members: list[dict]) -> dict:
  """runs, mean, sample std (nan for one run), and the members' seeds and test accuracies in
  seed order (space-separated, as the CSV keeps them)."""
  members = sorted(members, key=lambda m: m.get("seed", 0))
  accuracy = [m["test_accuracy"] for m in members]
  return dict(runs=len(members), mean=statistics.fmean(accuracy),
              std=statistics.stdev(accuracy) if len(accuracy) > 1 else float("nan"),
              accuracies=" ".join(f"{a:.4f}" for a in accuracy),
              seeds=" ".join(str(m["seed"]) for m in members))


def write_csvs(out: str, tables: dict[str, list[dict]]) -> None:
  """Writes each {file name: rows} as out/<file name> (columns: the first row's keys)."""
  for name, data in tables.items():
    with open(os.path.join(out, name), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(data[0]))
      writer.writeheader()
      writer.writerows(data)


def cells(rows: list[dict]) -> list[dict]:
  """Mean and sample std of test accuracy per (regime, model, cell, ε target) over seeds."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(row["regime"], row["model"], cell_name(row), row["target_epsilon"])].append(row)
  out = []
  for (regime, model, name, eps), members in sorted(
      groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3] or 0, kv[0][2])):
    members = sorted(members, key=lambda m: m["seed"])
    out.append(dict(
        regime=regime, model=model, cell=name, target_epsilon=eps, **accuracy_summary(members),
        fixed_switch=members[0]["switch_step"] if members[0]["variant"] == "dp" else None,
        warmup_steps=members[0]["warmup_steps"], augmult=members[0]["augmult"],
        switch_steps=" ".join(_switch_step_label(m) for m in members)
        if name.startswith("auto") else "",
        epsilon_spent=" ".join(f"{m['epsilon']:.3f}" for m in members
                               if m["epsilon"] is not None)))
  return out


def _switch_step_label(row: dict) -> str:
  """An automatic switch's step, marked "(cap)" when max_switch_step alone decided it and
  "(cap+)" when the criterion held at the cap's check too."""
  mark = {"cap": " (cap)", "criterion and cap": " (cap+)"}.get(row["switch_fired_by"], "")
  return f"{row['switch_step']}{mark}"


def markdown(table: list[dict]) -> str:
  lines = ["| regime | model | ε | variant | test accuracy (mean ± std) | runs | per seed | "
           "auto switch steps¹ | ε spent |", "|" + "---|" * 9]
  for c in table:
    eps = "—" if c["target_epsilon"] is None else f"{c['target_epsilon']:g}"
    std = "one run" if c["runs"] == 1 else f"± {c['std']:.4f}"
    lines.append(f"| {c['regime']} | {c['model']} | {eps} | {c['cell']} | {c['mean']:.4f} {std} "
                 f"| {c['runs']} | {c['accuracies']} | {c['switch_steps']} | "
                 f"{c['epsilon_spent']} |")
  lines.append("\n¹ (cap): the switch came from `mixing.auto.max_switch_step` alone, the criterion "
               "never held; (cap+): the criterion held first at the cap's check.")
  return "\n".join(lines)


def compare(a: dict, b: dict) -> str:
  """'d points (summed std s: holds / reversed / within the spread), by seed: …' for cells
  a − b: holds when the difference of means exceeds the summed seed spreads, reversed when below
  minus it. By seed: a − b for each seed both cells ran (one seed fixes the split, the
  initialisation and the public order of both runs), and whether every seed agrees in sign."""
  diff, spread = a["mean"] - b["mean"], a["std"] + b["std"]
  verdict = ("no spread (one run)" if math.isnan(spread) else "holds" if diff > spread
             else "reversed" if diff < -spread else "within the spread")
  return f"{diff * 100:+.2f} points (summed std {spread * 100:.2f}: {verdict})" + _by_seed(a, b)


def _by_seed(a: dict, b: dict) -> str:
  """', by seed: +x +y +z (every seed higher | every seed lower | mixed)' over the seeds both
  cells ran, in points; empty with fewer than two such seeds."""
  of = lambda c: dict(zip(c["seeds"].split(), map(float, c["accuracies"].split())))
  ours, theirs = of(a), of(b)
  diffs = [(ours[s] - theirs[s]) * 100 for s in ours if s in theirs]
  if len(diffs) < 2:
    return ""
  sign = ("every seed higher" if min(diffs) > 0 else "every seed lower" if max(diffs) < 0
          else "mixed")
  return f", by seed: {' '.join(f'{d:+.2f}' for d in diffs)} ({sign})"


def claims(table: list[dict]) -> list[str]:
  """The issue's claims 1, 2, 3 and 5 per (regime, model, ε), on the cells with the warm-up and
  K = 1: the best fixed switch (> 0) against private-only DP (switch 0), public-only and
  non-private; clipping-only against private-only DP; each automatic switch against the best
  fixed switch (within 1 point or not); then each fixed switch with K > 1 against the same
  switch with K = 1."""
  lines = []
  for regime, model in sorted({(c["regime"], c["model"]) for c in table}):
    here = [c for c in table if (c["regime"], c["model"]) == (regime, model)]
    baseline = {c["cell"]: c for c in here if c["target_epsilon"] is None}
    for eps in sorted({c["target_epsilon"] for c in here if c["target_epsilon"] is not None}):
      warm = [c for c in here if c["target_epsilon"] == eps and c["warmup_steps"] != 0]
      cells_eps = [c for c in warm if c["augmult"] == 1]
      fixed = {c["fixed_switch"]: c for c in cells_eps if c["fixed_switch"] is not None}
      scratch = fixed.pop(0, None)
      head = f"- {regime}, {model}, ε = {eps:g}: "
      best = max(fixed.values(), key=lambda c: c["mean"]) if fixed else None
      if best and scratch:
        lines.append(head + f"best fixed switch ({best['fixed_switch']}) vs private-only DP: "
                     + compare(best, scratch))
      if best and "public_only" in baseline:
        lines.append(head + "best fixed switch vs public-only: "
                     + compare(best, baseline["public_only"]))
      if best and "nonprivate" in baseline:
        lines.append(head + f"gap of the best fixed switch to non-private: "
                     f"{(baseline['nonprivate']['mean'] - best['mean']) * 100:.2f} points")
      if scratch and "clip_only" in baseline:
        lines.append(head + "clipping-only (σ = 0) vs private-only DP: "
                     + compare(baseline["clip_only"], scratch))
      for auto in (c for c in cells_eps if c["cell"].startswith("auto") and best):
        gap = (best["mean"] - auto["mean"]) * 100
        lines.append(head + f"{auto['cell']} (switched at {auto['switch_steps']}) vs the best "
                     f"fixed switch: {compare(auto, best)}; within 1 point: "
                     + ("yes" if gap <= 1 else "no"))
      for many in (c for c in warm if c["augmult"] != 1 and c["fixed_switch"] is not None):
        if many["fixed_switch"] in fixed or (many["fixed_switch"] == 0 and scratch):
          one = scratch if many["fixed_switch"] == 0 else fixed[many["fixed_switch"]]
          lines.append(head + f"{many['cell']} vs K = 1: " + compare(many, one))
  return lines


def plot(table: list[dict], rows: list[dict], regime: str, model: str, path: str) -> None:
  """Accuracy against the fixed switch step, the baselines as lines, each automatic-switch run as
  a point at the step where it switched: the runs of one regime and model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  table = [c for c in table if c["model"] == model]
  rows = [r for r in rows if r["model"] == model]
  fig, ax = plt.subplots(figsize=(9, 4.5))
  switches = [c for c in table if c["regime"] == regime and c["fixed_switch"] is not None]
  epsilons = sorted({r["target_epsilon"] for r in rows
                     if r["regime"] == regime and r["target_epsilon"] is not None})
  color = {eps: f"C{i}" for i, eps in enumerate(epsilons)}  # one colour per ε: line and its autos
  for eps, warmup, k in sorted({(c["target_epsilon"], c["warmup_steps"], c["augmult"])
                                for c in switches}):
    points = sorted((c["fixed_switch"], c["mean"], c["std"]) for c in switches
                    if (c["target_epsilon"], c["warmup_steps"], c["augmult"]) == (eps, warmup, k))
    xs, ys, es = zip(*points)
    ax.errorbar(xs, ys, yerr=[0 if e != e else e for e in es], marker="o" if k == 1 else "*",
                capsize=3, ls=":" if not warmup else "-" if k == 1 else "--", color=color[eps],
                alpha=1 if warmup else 0.4,
                label=f"public then DP, ε = {eps:g}" + ("" if warmup else ", no warm-up")
                + ("" if k == 1 else f", K = {k}"))
  markers = dict(auto="^", auto_plateau="s", auto_accplateau="X", auto_relplateau="D",
                 auto_lookahead="v", auto_window="P")
  autos = [r for r in rows if r["regime"] == regime and r["variant"].startswith("auto")
           and r["switch_step"] is not None]
  for key in sorted({(r["variant"], r["target_epsilon"], r["warmup_steps"]) for r in autos}):
    variant, eps, warmup = key
    points = [r for r in autos if (r["variant"], r["target_epsilon"], r["warmup_steps"]) == key]
    ax.scatter([r["switch_step"] for r in points], [r["test_accuracy"] for r in points],
               marker=markers.get(variant, "x"), facecolors="none" if not warmup else None,
               edgecolors=color[eps], color=color[eps], zorder=3,
               label=f"{variant} run, ε = {eps:g}" + ("" if warmup else ", no warm-up"))
  for c in table:
    if c["regime"] == regime and c["cell"] in ("public_only", "nonprivate", "clip_only"):
      ax.axhline(c["mean"], ls="--", lw=1, color={"public_only": "gray", "nonprivate": "black",
                                                  "clip_only": "tab:brown"}[c["cell"]],
                 label=f"{c['cell']} ({c['runs']} runs)")
  ax.set_xlabel("switch step (public steps before DP; 0 = private-only DP)")
  ax.set_ylabel("test accuracy (mean ± std over seeds)")
  ax.set_title(f"cifar10_jpeg, regime {regime}, {model}")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def runs_and_out(doc: str) -> tuple[str, str]:
  """(RUNS_DIR, --out or RUNS_DIR) from the command line of a table script (`doc`: its __doc__)."""
  parser = argparse.ArgumentParser(description=doc.split("\n")[0])
  parser.add_argument("runs_dir")
  parser.add_argument("--out", default=None, help="where to write (default: RUNS_DIR)")
  args = parser.parse_args()
  return args.runs_dir, args.out or args.runs_dir


def main() -> None:
  runs_dir, out = runs_and_out(__doc__)
  rows = run_rows(runs_dir)
  table = cells(rows)
  write_csvs(out, {"runs.csv": rows, "cells.csv": table})
  for regime, model in sorted({(c["regime"], c["model"]) for c in table}):
    suffix = "" if model == DEFAULT_MODEL else f"_{model}"
    plot(table, rows, regime, model, os.path.join(out, f"accuracy_{regime}{suffix}.png"))
  print(markdown(table))
  print("\nClaims (difference of means; a difference holds when it exceeds the summed std):\n")
  print("\n".join(claims(table)))


if __name__ == "__main__":
  main()
