"""Markdown tables of the contrastive experiments.

  python experiments/contrastive_table.py WORKDIR > experiments/results/contrastive.md
  python experiments/contrastive_table.py --cells OUTDIR [--out DIR] > DIR/table.md

The first (experiments/contrastive.sh): one row per run: ε, noise multiplier, sensitivity,
held-out contrastive loss, linear-probe test accuracy on each probe dataset, training time.

--cells (experiments/contrastive_cifar.sh, runs in OUTDIR/PART/VARIANT/): one row per cell
(method, expected batch, target ε) over its seeds: mean ± sample std of the first probe's test
accuracy and of the test InfoNCE loss, the ε spent, and the largest relative difference between
a run's ε and dp_accounting's PLD ε recomputed from its sampling rate, σ and private steps. With
--out, also DIR/runs.csv (one row per run), DIR/cells.csv and DIR/accuracy.png (probe accuracy
against the batch size, one line per method and ε).
"""

import argparse
import csv
import glob
import json
import os

import numpy as np


def load_runs(workdir: str) -> list[tuple[str, dict]]:
  """(name, results.json) of every run in WORKDIR/* and WORKDIR/*/* (sweeps), by path; a sweep
  run's overrides (its variant.json) under results["overrides"]."""
  runs = []
  for pattern in ("*", os.path.join("*", "*")):
    for path in sorted(glob.glob(os.path.join(workdir, pattern, "results.json"))):
      with open(path) as f:
        results = json.load(f)
      variant = os.path.join(os.path.dirname(path), "variant.json")
      if os.path.exists(variant):
        with open(variant) as f:
          results["overrides"] = json.load(f)["overrides"]
      runs.append((os.path.relpath(os.path.dirname(path), workdir), results))
  return runs


def run_table(workdir: str) -> None:
  runs = load_runs(workdir)
  datasets = sorted({d for _, r in runs for d in r["probe"]})
  print("| variant | ε (δ = 1e-5) | σ | sensitivity | steps | test InfoNCE loss | "
        + " | ".join(f"probe {d}" for d in datasets) + " | train s |")
  print("|---" * (7 + len(datasets)) + "|")
  order = lambda item: (item[1]["method"] != "random_init", item[1]["method"] != "nonprivate",
                        item[1]["method"], item[1]["privacy"]["epsilon"])
  for name, r in sorted(runs, key=order):
    p = r["privacy"]
    dp = not p["non_private"]
    sigma = f"{p['noise_multiplier']:.3f}" if dp and p["noise_multiplier"] else "—"
    cells = [name, f"{p['epsilon']:.2f}" if dp else "∞ (no DP)", sigma,
             f"{p['sensitivity']:.4g}" if dp else "—", str(r["steps"]),
             f"{r['test_contrastive_loss']:.3f}"]
    cells += [f"{r['probe'][d]['test_accuracy']:.4f}" if d in r["probe"] else "—"
              for d in datasets]
    cells.append(f"{r['train_seconds']:.0f}")
    print("| " + " | ".join(cells) + " |")


def accountant_epsilon(privacy: dict) -> float:
  """dp_accounting's PLD ε for the run's Poisson sampling rate, σ and private steps at its δ."""
  import dp_accounting  # here: the per-run table does not need it
  accountant = dp_accounting.pld.PLDAccountant()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      privacy["sampling_rate"], dp_accounting.GaussianDpEvent(privacy["noise_multiplier"])),
      privacy["private_steps"])
  return float(accountant.get_epsilon(privacy["delta"]))


def run_row(name: str, r: dict) -> dict:
  """One run's flat row: method, batch, target ε (the sweep's dp.target_epsilon, else the
  config's 8; None without DP), seed, the numbers."""
  p = r["privacy"]
  dp = not p["non_private"]
  checked = accountant_epsilon(p) if dp else None
  overrides = r.get("overrides", {})
  target = (float(overrides.get("dp.target_epsilon", 8.0)) if dp else None)  # the config's: 8
  seed = overrides.get("seed", "")
  return dict(run=name, method=r["method"], batch=int(p["expected_batch_size"]),
              target_epsilon=target, seed=seed, steps=r["steps"],
              probe_accuracy=r["test_accuracy"], test_loss=r["test_contrastive_loss"],
              epsilon=p["epsilon"] if dp else None, accountant_epsilon=checked,
              epsilon_rel_diff=abs(p["epsilon"] - checked) / checked if dp else None,
              sigma=p["noise_multiplier"] if dp else None,
              sensitivity=p["sensitivity"] if dp else None, train_seconds=r["train_seconds"])


def _mean_std(values: list[float]) -> str:
  return (f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1
          else f"{values[0]:.4f} (one run)")


METHOD_ORDER = ("random_init", "nonprivate", "logit_dp", "naive")


def cells(rows: list[dict]) -> list[dict]:
  """Rows grouped by (method, batch, target ε), in METHOD_ORDER, batch, ε."""
  groups: dict = {}
  for row in rows:
    groups.setdefault((row["method"], row["batch"], row["target_epsilon"]), []).append(row)
  out = []
  for (method, batch, target), members in sorted(groups.items(), key=lambda kv: (
      METHOD_ORDER.index(kv[0][0]), kv[0][1], kv[0][2] or 0)):
    accuracy = [m["probe_accuracy"] for m in members]
    dp = target is not None
    out.append(dict(
        method=method, batch=batch if method != "random_init" else None, target_epsilon=target,
        seeds=len(members), steps=sorted({m["steps"] for m in members}),
        probe_accuracy=_mean_std(accuracy), probe_mean=float(np.mean(accuracy)),
        probe_std=float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else 0.0,
        test_loss=_mean_std([m["test_loss"] for m in members]),
        epsilon=(f"{min(m['epsilon'] for m in members):.3f}–"
                 f"{max(m['epsilon'] for m in members):.3f}") if dp else "∞ (no DP)",
        epsilon_rel_diff=max(m["epsilon_rel_diff"] for m in members) if dp else None,
        per_seed=" ".join(f"{a:.4f}" for a in accuracy)))
  return out


def cell_table(workdir: str, out: str | None) -> None:
  rows = [run_row(name, r) for name, r in load_runs(workdir)]
  if not rows:
    raise SystemExit(f"No results.json under {workdir}/*/ or {workdir}/*/*/.")
  found = cells(rows)
  print("| method | batch | ε target | seeds | steps | probe accuracy (cifar10_jpeg) | per seed "
        "| test InfoNCE loss | ε spent | max \\|ε − dp_accounting\\| / ε |")
  print("|---" * 10 + "|")
  for c in found:
    diff = "—" if c["epsilon_rel_diff"] is None else f"{c['epsilon_rel_diff']:.1e}"
    print(f"| {c['method']} | {c['batch'] or '—'} | {c['target_epsilon'] or '—'} | "
          f"{c['seeds']} | {'/'.join(map(str, c['steps']))} | {c['probe_accuracy']} | "
          f"{c['per_seed']} | {c['test_loss']} | {c['epsilon']} | {diff} |")
  if out:
    os.makedirs(out, exist_ok=True)
    for name, table in (("runs.csv", rows), ("cells.csv", found)):
      with open(os.path.join(out, name), "w", newline="") as f:
        writer = csv.DictWriter(f, list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    plot(found, os.path.join(out, "accuracy.png"))


def plot(found: list[dict], path: str) -> None:
  """Probe accuracy (mean ± std over seeds) against the expected batch size, one line per
  (method, ε); random_init as a horizontal line."""
  from dpjax import sweeps  # matplotlib's Figure, as the sweep plots
  fig, (ax,) = sweeps.figure()
  lines: dict = {}
  for c in found:
    if c["method"] == "random_init":
      ax.axhline(c["probe_mean"], linestyle="--", color="grey", label="random init")
      continue
    label = c["method"] + (f", ε = {c['target_epsilon']}" if c["target_epsilon"] else "")
    lines.setdefault(label, []).append(c)
  for label, members in lines.items():
    members.sort(key=lambda c: c["batch"])
    ax.errorbar([c["batch"] for c in members], [c["probe_mean"] for c in members],
                yerr=[c["probe_std"] for c in members], marker="o", capsize=3, label=label)
  ax.set(xscale="log", xlabel="expected batch size", ylabel="linear-probe test accuracy",
         title="cifar10_jpeg: probe accuracy (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("--cells", action="store_true", help="mean ± std per cell (sweeps)")
  parser.add_argument("--out", default=None, help="with --cells: folder for CSVs and the figure")
  args = parser.parse_args()
  if args.cells:
    cell_table(args.workdir, args.out)
  else:
    run_table(args.workdir)


if __name__ == "__main__":
  main()
