"""Tabulates the cifar10_jpeg study of Bu et al. (2024): mean ± std over seeds per cell, a figure.

  python experiments/bu2024_cifar_table.py RUNS_DIR [--out DIR]

RUNS_DIR holds the sweep folders of `experiments/bu2024_cifar.sh` (REGIME_PART/<variant>/ with
results.json and variant.json). Writes DIR/cells.csv (one row per cell), DIR/runs.csv (one row per
run) and DIR/accuracy_REGIME.png (test accuracy against the switch step, one line per ε, the
baselines as bands of mean ± std), and prints the markdown table.
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import json
import os
import statistics


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
    if part.endswith("_plateau"):
      kind = "auto_plateau"
    privacy = r["privacy"]
    rows.append(dict(
        regime=config_arg[1], model=config_arg[2], variant=kind,
        switch_step=r.get("switch_step") if kind.startswith("auto") else
        (int(overrides["mixing.switch_step"]) if "mixing.switch_step" in overrides else None),
        target_epsilon=float(overrides["dp.target_epsilon"]) if "dp.target_epsilon" in overrides
        else None,
        seed=int(overrides["seed"]), test_accuracy=r["test_accuracy"],
        epsilon=privacy.get("epsilon"), private_steps=privacy.get("private_steps"),
        noise_multiplier=privacy.get("noise_multiplier"), train_seconds=r["train_seconds"],
        run=os.path.relpath(folder, runs_dir)))
  return rows


def cell_name(row: dict) -> str:
  if row["variant"] == "dp":
    return "private_only (switch 0)" if row["switch_step"] == 0 else f"switch {row['switch_step']}"
  return row["variant"]


def cells(rows: list[dict]) -> list[dict]:
  """Mean and sample std of test accuracy per (regime, model, cell, ε target) over seeds."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(row["regime"], row["model"], cell_name(row), row["target_epsilon"])].append(row)
  out = []
  for (regime, model, name, eps), members in sorted(
      groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3] or 0, kv[0][2])):
    accuracy = [m["test_accuracy"] for m in members]
    out.append(dict(
        regime=regime, model=model, cell=name, target_epsilon=eps, runs=len(members),
        mean=statistics.fmean(accuracy),
        std=statistics.stdev(accuracy) if len(accuracy) > 1 else float("nan"),
        accuracies=" ".join(f"{a:.4f}" for a in accuracy),
        switch_steps=" ".join(str(m["switch_step"]) for m in members)
        if name.startswith("auto") else "",
        epsilon_spent=" ".join(f"{m['epsilon']:.3f}" for m in members
                               if m["epsilon"] is not None)))
  return out


def markdown(table: list[dict]) -> str:
  lines = ["| regime | model | ε | variant | test accuracy (mean ± std) | runs | per seed | "
           "auto switch steps | ε spent |", "|" + "---|" * 9]
  for c in table:
    eps = "—" if c["target_epsilon"] is None else f"{c['target_epsilon']:g}"
    std = "one run" if c["runs"] == 1 else f"± {c['std']:.4f}"
    lines.append(f"| {c['regime']} | {c['model']} | {eps} | {c['cell']} | {c['mean']:.4f} {std} "
                 f"| {c['runs']} | {c['accuracies']} | {c['switch_steps']} | "
                 f"{c['epsilon_spent']} |")
  return "\n".join(lines)


def plot(table: list[dict], regime: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  switches = [c for c in table if c["regime"] == regime and (
      c["cell"].startswith("switch") or c["cell"].startswith("private_only"))]
  for eps in sorted({c["target_epsilon"] for c in switches}):
    points = sorted((0 if c["cell"].startswith("private") else int(c["cell"].split()[1]),
                     c["mean"], c["std"]) for c in switches if c["target_epsilon"] == eps)
    xs, ys, es = zip(*points)
    ax.errorbar(xs, ys, yerr=[0 if e != e else e for e in es], marker="o", capsize=3,
                label=f"public then DP, ε = {eps:g}")
  for c in table:
    if c["regime"] == regime and c["cell"] in ("public_only", "nonprivate", "clip_only"):
      ax.axhline(c["mean"], ls="--", lw=1, color={"public_only": "gray", "nonprivate": "black",
                                                  "clip_only": "tab:brown"}[c["cell"]],
                 label=f"{c['cell']} ({c['runs']} runs)")
  ax.set_xlabel("switch step (public steps before DP; 0 = private-only DP)")
  ax.set_ylabel("test accuracy (mean ± std over seeds)")
  ax.set_title(f"cifar10_jpeg, regime {regime}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs_dir")
  parser.add_argument("--out", default=None, help="where to write (default: RUNS_DIR)")
  args = parser.parse_args()
  out = args.out or args.runs_dir
  rows = run_rows(args.runs_dir)
  table = cells(rows)
  for name, data in (("runs.csv", rows), ("cells.csv", table)):
    with open(os.path.join(out, name), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(data[0]))
      writer.writeheader()
      writer.writerows(data)
  for regime in sorted({c["regime"] for c in table}):
    plot(table, regime, os.path.join(out, f"accuracy_{regime}.png"))
  print(markdown(table))


if __name__ == "__main__":
  main()
