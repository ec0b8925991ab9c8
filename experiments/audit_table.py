"""Markdown table of the audit experiment (experiments/audit.sh WORKDIR):

  python experiments/audit_table.py WORKDIR > table.md

One row per audited run (WORKDIR/<variant>/audit/audit.json): the accountant's ε, test accuracy,
the population loss-threshold attack, the canary attacks (AUC and TPR at 1% FPR) and the one-run
lower bound on ε with the attack that gave it.
"""

import glob
import json
import os
import sys


def _interval(a: dict) -> str:
  return f"{a['auc']:.3f} [{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}]"


def _tpr(a: dict, fpr: str) -> str:
  t = a["tpr_at_fpr"][fpr]
  return f"{t['value']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]"


def _consistent(report: dict) -> str:
  if report["accountant"]["epsilon_upper_bound"] is None:
    return "—"  # no claim to check
  return "yes" if report["consistent_with_accountant"] else "**NO**"


def main(workdir: str) -> None:
  rows = []
  for path in sorted(glob.glob(os.path.join(workdir, "*", "audit", "audit.json"))):
    run = os.path.dirname(os.path.dirname(path))
    with open(path) as f, open(os.path.join(run, "results.json")) as g:
      rows.append((os.path.basename(run), json.load(f), json.load(g)))
  rows.sort(key=lambda r: -(r[1]["accountant"]["epsilon_upper_bound"] or float("inf")))
  print("| run | accountant ε (δ = 1e-5) | test acc. | population AUC | canary attack | "
        "canary AUC | canary TPR @ 0.1% FPR | canary TPR @ 1% FPR | audit ε ≥ (95%) | "
        "≤ accountant |")
  print("|---" * 10 + "|")
  for name, report, results in rows:
    acc = report["accountant"]
    upper = "∞ (no DP)" if acc["epsilon_upper_bound"] is None else (
        f"{acc['epsilon_upper_bound']:.2f}")
    for i, (attack, a) in enumerate(report["canaries"]["attacks"].items()):
      first = i == 0
      cells = [name if first else "", upper if first else "",
               f"{results['test_accuracy']:.4f}" if first else "",
               _interval(report["population"]) if first else "", attack, _interval(a),
               _tpr(a, "0.001"), _tpr(a, "0.01"),
               f"{a['one_run']['epsilon_lower_bound']:.3f} ({a['one_run']['num_correct']}/"
               f"{a['one_run']['num_guesses']})",
               _consistent(report) if first else ""]
      print("| " + " | ".join(cells) + " |")
  print()
  for name, report, _ in rows:
    print(f"- {name}: audit ε ≥ {report['epsilon_lower_bound']:.3f} "
          f"({report['bound']['attack']}); {report['canaries']['inserted']} of "
          f"{report['canaries']['count']} canaries inserted, "
          f"{report['canaries']['num_shadow_runs']} shadow runs")


if __name__ == "__main__":
  main(sys.argv[1])
