"""Summarises finished runs as a markdown table: python -m dpjax.report WORKDIR [WORKDIR ...]."""

from __future__ import annotations

import json
import os
import sys


def load_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def results_table(workdirs: list[str]) -> str:
  lines = ["| run | test accuracy | ε | δ | accountant | private steps | public steps | σ | "
           "train s |", "|---|---|---|---|---|---|---|---|---|"]
  for workdir in workdirs:
    r = load_results(workdir)
    p = r["privacy"]
    eps = "∞ (no DP)" if p.get("non_private") else f"{p['epsilon']:.3f}"
    sigma = "—" if p["noise_multiplier"] is None else f"{p['noise_multiplier']:.3f}"
    lines.append(f"| {os.path.basename(os.path.normpath(workdir))} | {r['test_accuracy']:.4f} | "
                 f"{eps} | {p['delta']:g} | {p['accountant']} | {p['private_steps']} | "
                 f"{p['public_steps']} | {sigma} | {r['train_seconds']:.0f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(results_table(sys.argv[1:]))
