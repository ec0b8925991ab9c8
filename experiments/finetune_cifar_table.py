"""Tabulates the DP fine-tuning study at CIFAR scale (experiments/finetune_cifar.sh): test accuracy
mean ± std over seeds per (regime, model, ε, method, learning rate), each run's ε against
dp_accounting's for the steps it ran, the claims' comparisons, and a figure.

  python experiments/finetune_cifar_table.py RUNS_DIR [--out DIR]

RUNS_DIR holds the sweep folders (R_pretrain, R_selection, R_sparse, R_lr) with results.json and
variant.json per run. Writes DIR/runs.csv, DIR/cells.csv and DIR/finetune_R_MODEL.png (accuracy
against ε at the default learning rate; against the learning rate at ε = 3) and prints markdown.

A comparison A vs B "holds" when mean(A) − mean(B) exceeds the summed seed spreads std(A) + std(B),
"reversed" when it is below minus that, and is "within the spread" otherwise. "Best layer subset"
and "tuned" (each method at its best learning rate) are picked on the test accuracy they are
reported with, which favours them: say so when quoting them.
"""

from __future__ import annotations

import collections
import json
import glob
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, as a script too
import bu2024_cifar_table  # noqa: E402
import finetune_cifar  # noqa: E402

TUNED_EPSILON = 3.0  # the learning-rate grid's ε (experiments/finetune_cifar.sh lr)
SUBSETS = ("head", "bias", "last_blocks", "attention", "mlp")  # the layer subsets besides "all"


def dp_accounting_epsilon(privacy: dict) -> float | None:
  """ε at the run's δ of the private steps it ran, computed here with dp_accounting (PLD at
  dpjax's discretisation, or RDP at its orders), or None for a run composed with a source's
  private steps (not this study's: its pre-training takes none)."""
  import dp_accounting  # here: tabulating CSVs alone does not need it
  from dpjax.privacy import accounting
  if (privacy.get("composed_from") or {}).get("private_steps"):
    return None
  steps = privacy["private_steps"]
  if not steps:
    return 0.0
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      privacy["sampling_rate"], dp_accounting.GaussianDpEvent(privacy["noise_multiplier"])),
      steps)
  if privacy["accountant"] == "pld":
    accountant = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=accounting.PLD_DISCRETIZATION)
  elif privacy["accountant"] == "rdp":
    accountant = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))
  else:
    raise ValueError(f"No dp_accounting check for accountant {privacy['accountant']!r}.")
  return float(accountant.compose(event).get_epsilon(privacy["delta"]))


def run_rows(runs_dir: str) -> list[dict]:
  """One dict per finished run (pre-training included, method "pretrain")."""
  rows = []
  for results in sorted(glob.glob(os.path.join(runs_dir, "*", "*", "results.json"))):
    folder = os.path.dirname(results)
    with open(os.path.join(folder, "variant.json")) as f:
      variant = json.load(f)
    with open(results) as f:
      r = json.load(f)
    method, regime, model = variant["config"].partition(":")[2].split(",")
    privacy, config = r["privacy"], r["config"]
    dp = method != "pretrain"
    rows.append(dict(
        regime=regime, model=model, method=method,
        target_epsilon=config["dp"]["target_epsilon"] if dp else None,
        learning_rate=config["optimizer"]["learning_rate"], seed=int(variant["overrides"]["seed"]),
        test_accuracy=r["test_accuracy"], epsilon=privacy.get("epsilon"),
        epsilon_dp_accounting=dp_accounting_epsilon(privacy),
        private_steps=privacy.get("private_steps"), noise_multiplier=privacy.get("noise_multiplier"),
        trainable_params=(r.get("finetune") or {}).get("trainable_params"),
        train_seconds=r.get("train_seconds"), run=os.path.relpath(folder, runs_dir)))
  return rows


def cells(rows: list[dict]) -> list[dict]:
  """Mean ± std of test accuracy per (regime, model, ε target, method, learning rate)."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(row["regime"], row["model"], row["target_epsilon"], row["method"],
            row["learning_rate"])].append(row)
  out = []
  for (regime, model, eps, method, lr), members in sorted(
      groups.items(), key=lambda kv: (kv[0][:2], kv[0][2] or 0, kv[0][3], kv[0][4])):
    gaps = [abs(m["epsilon"] - m["epsilon_dp_accounting"]) for m in members
            if m["epsilon_dp_accounting"] is not None and m["epsilon"] is not None]
    out.append(dict(
        regime=regime, model=model, target_epsilon=eps, method=method, learning_rate=lr,
        **bu2024_cifar_table.accuracy_summary(members),
        epsilon_spent=" ".join(f"{m['epsilon']:.4f}" for m in members if m["epsilon"] is not None),
        max_epsilon_gap=max(gaps) if gaps else None,
        trainable_params=members[0]["trainable_params"]))
  return out


def default_rate(model: str) -> float:
  return finetune_cifar.bu2024_cifar.MODELS[model][1]


def _cell_text(c: dict | None) -> str:
  if c is None:
    return "—"
  return f"{c['mean']:.4f} ({c['runs']})" if c["runs"] == 1 else (
      f"{c['mean']:.4f} ± {c['std']:.4f}")


compare = bu2024_cifar_table.compare  # 'd points (summed std s: verdict)' for cells a − b


def claims(by_method: dict[str, dict]) -> list[str]:
  """The issue's claims on one set of cells {method: cell} (one ε, one lr choice)."""
  lines = []
  subsets = [by_method[m] for m in SUBSETS if m in by_method]
  if "all" in by_method and subsets:
    best = max(subsets, key=lambda c: c["mean"])
    lines.append(f"best layer subset ({best['method']}) vs full fine-tuning: "
                 + compare(best, by_method["all"]))
  if "sparta" in by_method:
    for other in ("all", "head", "magnitude", "random"):
      if other in by_method:
        lines.append(f"sparta vs {other}: " + compare(by_method["sparta"], by_method[other]))
  return lines


def markdown(table: list[dict], rows: list[dict]) -> str:
  out = []
  for regime, model in sorted({(c["regime"], c["model"]) for c in table}):
    mine = [c for c in table if (c["regime"], c["model"]) == (regime, model)]
    default = default_rate(model)
    at_default = {(c["target_epsilon"], c["method"]): c for c in mine
                  if math.isclose(c["learning_rate"], default) and c["method"] != "pretrain"}
    epsilons = sorted({e for e, _ in at_default})
    methods = [m for m in finetune_cifar.METHODS[model] if any(k[1] == m for k in at_default)]
    out.append(f"### Regime {regime}, {model}\n")
    for c in mine:
      if c["method"] == "pretrain":
        out.append(f"Pre-training alone (public part, no DP): test accuracy {_cell_text(c)}.\n")
    out.append(f"Test accuracy (mean ± std over seeds) at the default learning rate {default:g}:\n")
    out.append("| method | trainable params | " + " | ".join(f"ε = {e:g}" for e in epsilons)
               + " |")
    out.append("|---|---|" + "---|" * len(epsilons))
    for m in methods:
      params = next((c["trainable_params"] for (e, mm), c in at_default.items() if mm == m), "")
      out.append(f"| {m} | {params} | " + " | ".join(_cell_text(at_default.get((e, m)))
                                                    for e in epsilons) + " |")
    grid = {(c["method"], c["learning_rate"]): c for c in mine
            if c["target_epsilon"] == TUNED_EPSILON}
    rates = sorted({lr for _, lr in grid})
    if len(rates) > 1:
      out.append(f"\nSelection × learning rate at ε = {TUNED_EPSILON:g}:\n")
      out.append("| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | best lr |")
      out.append("|---|" + "---|" * (len(rates) + 1))
      tuned = {}
      for m in methods:
        mine_m = [grid[(m, lr)] for lr in rates if (m, lr) in grid]
        if mine_m:
          tuned[m] = max(mine_m, key=lambda c: c["mean"])
        best = f"{tuned[m]['learning_rate']:g}" if m in tuned else "—"
        out.append(f"| {m} | " + " | ".join(_cell_text(grid.get((m, lr))) for lr in rates)
                   + f" | {best} |")
    out.append("\nClaims (difference of means; a claim holds when it exceeds the summed std):\n")
    for eps in epsilons:
      by_method = {m: c for (e, m), c in at_default.items() if e == eps}
      out += [f"- ε = {eps:g}, default lr: {line}" for line in claims(by_method)]
    if len(rates) > 1:
      out += [f"- ε = {TUNED_EPSILON:g}, each method at its best lr (picked on these numbers): "
              f"{line}" for line in claims(tuned)]
    out.append("")
  checked = [r for r in rows if r["epsilon_dp_accounting"] is not None and r["private_steps"]]
  gap = max((abs(r["epsilon"] - r["epsilon_dp_accounting"]) for r in checked), default=None)
  out.append(f"ε check: {len(checked)} DP runs; largest |ε reported − ε of dp_accounting for the "
             f"steps that ran| = {gap if gap is None else f'{gap:.2e}'}.")
  return "\n".join(out)


def plot(table: list[dict], regime: str, model: str, path: str) -> None:
  from dpjax import sweeps
  mine = [c for c in table if (c["regime"], c["model"]) == (regime, model)
          and c["method"] != "pretrain"]
  fig, (by_eps, by_lr) = sweeps.figure(2)
  for i, m in enumerate(finetune_cifar.METHODS[model]):
    style = dict(marker="o", capsize=3, color=f"C{i}", label=m,
                 ls="--" if m in finetune_cifar.SPARSE_METHODS else "-")
    for ax, cells_m, x in (
        (by_eps, [c for c in mine if c["method"] == m
                  and math.isclose(c["learning_rate"], default_rate(model))], "target_epsilon"),
        (by_lr, [c for c in mine if c["method"] == m
                 and c["target_epsilon"] == TUNED_EPSILON], "learning_rate")):
      points = sorted((c[x], c["mean"], 0.0 if math.isnan(c["std"]) else c["std"])
                      for c in cells_m)
      if points:
        xs, ys, errors = zip(*points)
        ax.errorbar(xs, ys, yerr=errors, **style)
  by_eps.set(xlabel="ε (δ = 1e-5)", ylabel="test accuracy (mean ± std over seeds)",
             title=f"cifar10_jpeg regime {regime}, {model}: default lr")
  by_lr.set(xscale="log", xlabel="learning rate (Adam)", ylabel="test accuracy",
            title=f"ε = {TUNED_EPSILON:g}: the learning-rate grid")
  for ax in (by_eps, by_lr):
    ax.grid(alpha=0.3)
  by_eps.legend(fontsize=7)
  fig.savefig(path, dpi=120)


def main() -> None:
  runs_dir, out = bu2024_cifar_table.runs_and_out(__doc__)
  rows = run_rows(runs_dir)
  if not rows:
    raise SystemExit(f"No finished run (*/*/results.json) under {runs_dir}.")
  table = cells(rows)
  bu2024_cifar_table.write_csvs(out, {"runs.csv": rows, "cells.csv": table})
  for regime, model in sorted({(c["regime"], c["model"]) for c in table}):
    plot(table, regime, model, os.path.join(out, f"finetune_{regime}_{model}.png"))
  print(markdown(table, rows))


if __name__ == "__main__":
  main()
