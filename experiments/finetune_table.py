"""Markdown table of the DP fine-tuning experiment (experiments/finetune.sh WORKDIR):

  python experiments/finetune_table.py WORKDIR > experiments/results/finetune.md

Test accuracy per variant (rows) and ε (columns), trainable parameter counts, and the
selection × learning-rate sweep at ε = 3.
"""

import csv
import glob
import os
import sys


def rows(path: str) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def main(workdir: str) -> None:
  table: dict[str, dict[str, str]] = {}
  trainable: dict[str, str] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "eps*", "*", "results.csv"))):
    eps, sweep = path.split(os.sep)[-3:-1]
    if sweep == "lr":
      continue
    for r in rows(path):
      name = (f"selection={r['finetune.selection']}" if sweep == "selection"
              else f"sparse={r['finetune.sparse']}")
      table.setdefault(name, {})[eps] = f"{float(r['test_accuracy']):.4f} (ε {float(r['privacy.epsilon']):.2f})"
      trainable[name] = r["finetune.trainable_params"]
  epsilons = sorted({e for v in table.values() for e in v}, key=lambda e: float(e[3:]))
  print("| variant | trainable params (end) | " + " | ".join(epsilons) + " |")
  print("|---|---|" + "---|" * len(epsilons))
  for name, by_eps in table.items():
    print(f"| {name} | {trainable[name]} | " + " | ".join(by_eps.get(e, "-") for e in epsilons)
          + " |")
  lr = glob.glob(os.path.join(workdir, "eps3", "lr", "results.csv"))
  base = glob.glob(os.path.join(workdir, "eps3", "selection", "results.csv"))
  if lr:
    grid: dict[str, dict[str, str]] = {}
    for path, default_lr in [(lr[0], None)] + [(b, "1.0") for b in base]:
      for r in rows(path):
        rate = r.get("optimizer.learning_rate") or default_lr
        grid.setdefault(r["finetune.selection"], {})[str(float(rate))] = (
            f"{float(r['test_accuracy']):.4f}")
    rates = sorted({k for v in grid.values() for k in v}, key=float)
    print("\nSelection × learning rate at ε = 3 (test accuracy):\n")
    print("| selection | " + " | ".join(f"lr {x}" for x in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for name, by_rate in grid.items():
      print(f"| {name} | " + " | ".join(by_rate.get(x, "-") for x in rates) + " |")


if __name__ == "__main__":
  main(sys.argv[1])
