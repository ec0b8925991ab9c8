"""Markdown table of the contrastive experiment (experiments/contrastive.sh WORKDIR):

  python experiments/contrastive_table.py WORKDIR > experiments/results/contrastive.md

One row per variant: ε, noise multiplier, sensitivity, held-out contrastive loss, linear-probe
test accuracy on each probe dataset, training time.
"""

import glob
import json
import os
import sys


def main(workdir: str) -> None:
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, "*", "results.json"))):
    with open(path) as f:
      runs.append((os.path.basename(os.path.dirname(path)), json.load(f)))
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


if __name__ == "__main__":
  main(sys.argv[1])
