"""Replays the automatic switch's criteria on the public statistics that finished runs logged.

Every check of an automatic-switch run writes its public statistics to metrics.jsonl (a
"curvature" record: held-out public loss, public training loss, DP efficiency, ...), and those of
its public phase do not depend on the criterion: up to its switch, a run is the same computation
under any criterion (the seed fixes the public split, order and probes). So feeding the logged
records of one run to `mixing.AutoSwitch` under other settings says where those settings would
have switched, without training again, as long as they would have switched before the run did.
Where they would not, the replay says "> S", S being the last public-phase check logged.

  python experiments/bu2024_cifar_replay.py experiments/results/bu2024_cifar/runs/B_lookahead \\
      experiments/results/bu2024_cifar/runs/B_autowindow > replay.md

Each run's own criterion, replayed, must give its recorded switch step (the "own" column: a
check of the replay; a mismatch is printed as such). Reads public statistics only, as the
criteria do.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Iterable

from dpjax import mixing
from dpjax.config import mixing_block
from dpjax.train import metrics

# name -> AutoSwitch settings. Held-out criteria need only held-out (and training) losses, which
# every automatic run logs; the accuracy plateaus need the held-out accuracy (logged since
# afe0337); the efficiency ones need the curvature records of efficiency runs.
RULES: dict[str, dict] = {
    "plateau, patience 2": dict(criterion="plateau", patience=2),
    "plateau, patience 3": dict(criterion="plateau", patience=3),
    "plateau, patience 4": dict(criterion="plateau", patience=4),
    "plateau, patience 5": dict(criterion="plateau", patience=5),
    "plateau 1%, patience 3": dict(criterion="plateau", patience=3, min_rel_delta=0.01),
    "plateau 5%, patience 2": dict(criterion="plateau", patience=2, min_rel_delta=0.05),
    "accuracy plateau, patience 3": dict(criterion="plateau", patience=3,
                                         plateau_metric="accuracy"),
    "accuracy plateau, patience 5": dict(criterion="plateau", patience=5,
                                         plateau_metric="accuracy"),
    "efficiency, g over 1 check": dict(criterion="efficiency", generalisation_checks=1),
    "efficiency, g over 3 checks": dict(criterion="efficiency", generalisation_checks=3),
    "efficiency, g over 5 checks": dict(criterion="efficiency", generalisation_checks=5),
}
def public_checks(run_dir: str) -> tuple[list[dict], int, dict]:
  """(the run's check records up to and including its switch step, its switch step, its
  mixing.auto config): the checks of its public phase (`mixing.is_check_step`; the check at
  max_switch_step itself since aa94048)."""
  with open(os.path.join(run_dir, "results.json")) as f:
    results = json.load(f)
  auto = results["config"]["mixing"]["auto"]
  switch = results["switch_step"]
  records = [{k: metrics.as_number(v) for k, v in r.items()}
             for r in metrics.read_metrics(run_dir)
             if r["kind"] == "curvature" and r["step"] <= switch
             and mixing.is_check_step(r["step"], auto["check_every"], auto["min_switch_step"],
                                      auto["max_switch_step"] if auto["max_switch_step"] >= 0
                                      else None)]
  return records, switch, auto


def replay(records: Iterable[dict], auto: mixing.AutoSwitch) -> int | None:
  """The step where `auto` (a fresh AutoSwitch) switches on `records`, or None."""
  for r in records:
    if auto.observe(r["step"], r.get("loss_improvement_public"), r.get("loss_improvement_dp"),
                    r.get("heldout_loss"), r.get("dp_efficiency"), r.get("public_train_loss"),
                    r.get("lookahead_heldout_fall"), r.get("heldout_accuracy")):
      return auto.switch_step
  return None


def own_switch(auto: dict) -> mixing.AutoSwitch:
  """The run's own AutoSwitch, built from its config's mixing.auto block as the trainer builds
  it. A run recorded before `plateau_metric` existed watched the loss (the default then; the
  accuracy since 2026-12-04), so a block without the key replays with the loss."""
  return mixing_block.AutoSwitchSpec.from_mapping({"plateau_metric": "loss", **auto}).build(0, 0)


def needs(rule: dict) -> str:
  """The record key a rule cannot decide without."""
  if rule["criterion"] == "efficiency":
    return "dp_efficiency"
  return "heldout_accuracy" if rule.get("plateau_metric") == "accuracy" else "heldout_loss"


def table(run_dirs: list[str]) -> str:
  names = list(RULES)
  lines = ["| run | switched at | own, replayed | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
  for run in run_dirs:
    records, switch, auto = public_checks(run)
    own = replay(records, own_switch(auto))
    own_text = str(own) if own == switch else f"{own} (MISMATCH)"
    last = records[-1]["step"] if records else 0
    cells = []
    for name in names:
      rule = RULES[name]
      if not any(needs(rule) in r for r in records):
        cells.append("—")
        continue
      found = replay(records, mixing.AutoSwitch(**rule))
      cells.append(f"> {last}" if found is None else str(found))
    label = os.path.join(os.path.basename(os.path.dirname(run)), os.path.basename(run))
    lines.append(f"| {label} | {switch} | {own_text} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("parts", nargs="+", help="sweep folders of automatic-switch runs")
  args = parser.parse_args()
  runs = sorted(os.path.dirname(p) for part in args.parts
                for p in glob.glob(os.path.join(part, "*", "results.json")))
  print(table(runs))


if __name__ == "__main__":
  main()
