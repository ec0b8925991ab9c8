"""Auditing a finished run: membership inference on its data and canaries, a lower bound on ε.

  report = audit_run("workdir/run", shadow_workdirs=["workdir/shadow1", ...])
  write_report(report, "workdir/run/audit")     # audit.json and roc.png
  check_against_accountant(report)              # raises PrivacyViolation if the bound exceeds ε

What is attacked:
  population  loss threshold on examples of the trained part (members) against test examples
              (non-members). Members were sampled by Poisson sampling, so each was seen in
              expectation q·T times; this measures how much the model gives away on typical data.
  canaries    the run's canaries (config.audit), inserted with probability 1/2 each: loss
              threshold, and LiRA (online and offline) when shadow runs are given — runs of the same
              config with other audit.inclusion_seed (and seed) values, so each canary is IN some
              shadows and OUT of others.
The lower bound on ε is Steinke, Nasr & Jagielski's one-run bound from the canary scores
(`bounds.best_one_run_bound`), at the run's δ; the confidence is split evenly over the canary
attacks and their numbers of guesses, so the headline bound holds at the stated confidence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from dpjax import config as config_lib
from dpjax import parallel, sweeps
from dpjax.audit import attacks, bounds, roc
from dpjax.audit import canaries as canaries_lib
from dpjax.train import checkpoint, loop, state as state_lib


class AuditError(RuntimeError):
  """The run (or a shadow run) cannot be audited as asked."""


class PrivacyViolation(AssertionError):
  """An audit's lower bound on ε exceeds the accountant's upper bound: a privacy bug somewhere
  (in training, accounting or the audit itself), never a result to report as normal."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run trained with: the defaults, updated with the trajectory blocks recorded in
  its latest checkpoint (performance and mesh settings are this machine's defaults)."""
  with checkpoint.Checkpointer(workdir) as checkpointer:
    record = checkpointer.read_record()
  config = config_lib.default_config()
  for block, values in record["config"].items():
    if isinstance(values, dict):
      _update(config[block], values)
    else:
      config[block] = values
  config.mesh.data = 1  # auditing is forward passes on one device
  return config


def _update(block: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict):
      _update(block[key], value)
    else:
      block[key] = value


@dataclasses.dataclass(frozen=True)
class RunOutputs:
  """One trained run's logits on the examples an audit scores (host arrays).

  canary_logits is float [m, K] (None without canaries); member_* / nonmember_* are float [n, K]
  logits and int [n] labels of trained-part examples (not canaries) and of test examples.
  """
  workdir: str
  config: ml_collections.ConfigDict
  results: dict
  canaries: canaries_lib.Canaries | None
  canary_logits: np.ndarray | None
  member_logits: np.ndarray
  member_labels: np.ndarray
  nonmember_logits: np.ndarray
  nonmember_labels: np.ndarray
  members_from: str


def run_outputs(workdir: str, num_population: int = 5000, seed: int = 0,
                batch_size: int = 1000) -> RunOutputs:
  """Loads a finished run (results.json and its verified latest checkpoint) and computes the
  logits an audit needs. Raises AuditError for an unfinished run."""
  results_path = os.path.join(workdir, "results.json")
  if not os.path.exists(results_path):
    raise AuditError(f"{results_path} does not exist: audit a finished run (rerun its training "
                     "command to finish it).")
  with open(results_path) as f:
    results = json.load(f)
  config = load_run_config(workdir)
  loaded = state_lib.load_training_data(config)
  params, _ = loop.load_trained_state(config, workdir, loaded.parts)
  model, _ = state_lib.create_model(config, loaded.parts.private)
  params = parallel.to_host(params)
  apply = jax.jit(lambda images: model.apply({"params": params}, images))
  preprocess = state_lib.preprocessor(config)

  def logits(images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(apply(preprocess(images[i:i + batch_size])), np.float64)
                           for i in range(0, len(images), batch_size)])

  canaries = loaded.canaries
  part_name = canaries.part if canaries is not None else (
      "private" if len(loaded.parts.private) else "public")
  part = getattr(loaded.parts, part_name)
  own = len(part) - (int(canaries.included.sum()) if canaries is not None else 0)
  n = min(num_population, own, len(loaded.test))
  rng = np.random.default_rng(seed)
  members = np.sort(rng.choice(own, n, replace=False))
  nonmembers = np.sort(rng.choice(len(loaded.test), n, replace=False))
  return RunOutputs(
      workdir=workdir, config=config, results=results, canaries=canaries,
      canary_logits=None if canaries is None else logits(canaries.images),
      member_logits=logits(part.images[members]), member_labels=part.labels[members],
      nonmember_logits=logits(loaded.test.images[nonmembers]),
      nonmember_labels=loaded.test.labels[nonmembers], members_from=part_name)


def audit_run(workdir: str, shadow_workdirs: Sequence[str] = (), confidence: float = 0.95,
              num_population: int = 5000, num_bootstrap: int = 500, seed: int = 0
              ) -> dict[str, Any]:
  """Audits the finished run in `workdir` (see the module docstring); returns the report."""
  target = run_outputs(workdir, num_population, seed)
  privacy = target.results["privacy"]
  delta = privacy["delta"]
  metrics = lambda member, nonmember: roc.attack_metrics(member, nonmember,
                                                         num_bootstrap=num_bootstrap,
                                                         confidence=confidence, seed=seed)
  member = attacks.loss_threshold_scores(attacks.per_example_loss(target.member_logits,
                                                                  target.member_labels))
  nonmember = attacks.loss_threshold_scores(attacks.per_example_loss(target.nonmember_logits,
                                                                     target.nonmember_labels))
  population = dict(attack="loss_threshold", members_from=target.members_from,
                    nonmembers_from="test", **metrics(member, nonmember))
  report = dict(workdir=os.path.abspath(workdir),
                shadow_workdirs=[os.path.abspath(w) for w in shadow_workdirs],
                accountant=_accountant_summary(privacy, target.canaries), confidence=confidence,
                population=population, canaries=None, epsilon_lower_bound=None,
                curves=dict(population=roc.roc_curve(member, nonmember)))
  if target.canaries is None:
    if shadow_workdirs:
      raise AuditError(f"{workdir} has no canaries (config.audit.canaries = 0), so shadow runs "
                       "have nothing to calibrate.")
    report["consistent_with_accountant"] = True
    return report
  scores = _canary_scores(target, shadow_workdirs, seed)
  included = target.canaries.included
  per_attack = 1.0 - (1.0 - confidence) / len(scores)  # Bonferroni over the attacks
  canary_attacks = {}
  for name, s in scores.items():
    one_run = bounds.best_one_run_bound(s, included, delta, per_attack)
    canary_attacks[name] = dict(metrics(s[included], s[~included]),
                                one_run=dataclasses.asdict(one_run))
    report["curves"][f"canaries/{name}"] = roc.roc_curve(s[included], s[~included])
  best = max(canary_attacks, key=lambda k: canary_attacks[k]["one_run"]["epsilon_lower_bound"])
  c = target.canaries
  report["canaries"] = dict(count=len(c), kind=c.kind, part=c.part, inserted=int(included.sum()),
                            num_shadow_runs=len(shadow_workdirs), attacks=canary_attacks)
  report["epsilon_lower_bound"] = canary_attacks[best]["one_run"]["epsilon_lower_bound"]
  report["bound"] = dict(
      attack=best, method="one-run audit (Steinke, Nasr & Jagielski 2023), add/remove of one "
      f"canary, at the run's delta = {delta:g}; confidence {confidence} split over "
      f"{len(scores)} attacks x {len(bounds.GUESS_FRACTIONS)} guess counts "
      "(Bonferroni)")
  upper = report["accountant"]["epsilon_upper_bound"]
  report["consistent_with_accountant"] = upper is None or report["epsilon_lower_bound"] <= upper
  return report


def _canary_scores(target: RunOutputs, shadow_workdirs: Sequence[str], seed: int
                   ) -> dict[str, np.ndarray]:
  """Each canary attack's scores [m]: loss threshold, plus LiRA with shadow runs."""
  c = target.canaries
  scores = dict(loss_threshold=attacks.loss_threshold_scores(
      attacks.per_example_loss(target.canary_logits, c.labels)))
  if not shadow_workdirs:
    return scores
  shadows = [run_outputs(w, num_population=1, seed=seed) for w in shadow_workdirs]
  for s in shadows:
    _check_same_canaries(target, s)
  confidences = np.stack([attacks.logit_confidence(s.canary_logits, c.labels) for s in shadows])
  shadow_in = np.stack([s.canaries.included for s in shadows])
  mine = attacks.logit_confidence(target.canary_logits, c.labels)
  scores["lira_offline"] = attacks.lira_scores(mine, confidences, shadow_in, online=False)
  if shadow_in.any():
    scores["lira_online"] = attacks.lira_scores(mine, confidences, shadow_in, online=True)
  return scores


def _check_same_canaries(target: RunOutputs, shadow: RunOutputs) -> None:
  a, b = target.canaries, shadow.canaries
  same = (b is not None and len(a) == len(b) and a.kind == b.kind and a.part == b.part
          and np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images))
  if not same:
    raise AuditError(f"The shadow run {shadow.workdir} does not have the target's canaries; train "
                     "shadows with the same config (data, audit.canaries, audit.kind, audit.seed, "
                     "audit.insert_into) and other audit.inclusion_seed values.")
  if np.array_equal(a.included, b.included):
    raise AuditError(f"The shadow run {shadow.workdir} inserted exactly the target's canaries "
                     "(same audit.inclusion_seed?); a shadow must flip its own coins.")


def _accountant_summary(privacy: dict, canaries: canaries_lib.Canaries | None
                        ) -> dict[str, Any]:
  """The accountant's claim: epsilon_upper_bound is the smallest ε over its accountants (each
  is a valid upper bound), or None when the run claims nothing about the audited examples (a
  non-private run, or canaries in the public set, which no DP guarantee covers)."""
  non_private = privacy.get("non_private") or privacy.get("noise_multiplier") is None
  valid = [e for e in privacy.get("epsilon_by_accountant", {}).values()
           if e is not None and math.isfinite(e)]
  covered = canaries is None or canaries.part == "private"
  upper = None if non_private or not valid or not covered else min(valid)
  return dict(epsilon=privacy["epsilon"], delta=privacy["delta"],
              accountant=privacy["accountant"], epsilon_upper_bound=upper,
              non_private=bool(non_private), canaries_covered_by_claim=covered,
              private_steps=privacy["private_steps"],
              noise_multiplier=privacy["noise_multiplier"])


def check_against_accountant(report: dict[str, Any]) -> None:
  """Raises PrivacyViolation when the audit's lower bound exceeds the accountant's ε."""
  if report.get("consistent_with_accountant", True):
    return
  raise PrivacyViolation(
      f"PRIVACY VIOLATION: the audit of {report['workdir']} shows epsilon >= "
      f"{report['epsilon_lower_bound']:.3f} at confidence {report['confidence']}, above the "
      f"accountant's epsilon = {report['accountant']['epsilon_upper_bound']:.3f} (delta = "
      f"{report['accountant']['delta']:g}). Training, accounting or the audit has a bug: do not "
      "publish this model's privacy claim until it is found.")


def write_report(report: dict[str, Any], out_dir: str) -> tuple[str, str]:
  """Writes out_dir/audit.json (the report without curves) and out_dir/roc.png; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, png_path = os.path.join(out_dir, "audit.json"), os.path.join(out_dir, "roc.png")
  with open(json_path, "w") as f:
    json.dump({k: v for k, v in report.items() if k != "curves"}, f, indent=2)
  fig, (ax,) = sweeps.figure()
  for name, (fpr, tpr) in report["curves"].items():
    ax.plot(fpr, tpr, label=name, drawstyle="steps-post")
  floor = 1e-4
  ax.plot([floor, 1], [floor, 1], "k:", label="chance")
  ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
         ylabel="true positive rate",
         title=f"MIA ROC; accountant eps = {_format(report['accountant']['epsilon_upper_bound'])}, "
               f"audit eps >= {_format(report['epsilon_lower_bound'])}")
  ax.legend(loc="lower right", fontsize=8)
  fig.savefig(png_path, dpi=120)
  return json_path, png_path


def _format(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def summary(report: dict[str, Any]) -> str:
  """A few lines for the terminal."""
  p, acc = report["population"], report["accountant"]
  lines = [f"accountant: epsilon {_format(acc['epsilon_upper_bound'])} at delta {acc['delta']:g}"
           + (" (non-private run)" if acc["non_private"] else ""),
           f"population loss-threshold MIA: AUC {p['auc']:.3f} "
           f"[{p['auc_ci'][0]:.3f}, {p['auc_ci'][1]:.3f}], TPR@1%FPR "
           f"{p['tpr_at_fpr']['0.01']['value']:.4f}"]
  if report["canaries"]:
    for name, a in report["canaries"]["attacks"].items():
      lines.append(f"canaries {name}: AUC {a['auc']:.3f} [{a['auc_ci'][0]:.3f}, "
                   f"{a['auc_ci'][1]:.3f}], one-run epsilon >= "
                   f"{a['one_run']['epsilon_lower_bound']:.3f} ({a['one_run']['num_correct']}/"
                   f"{a['one_run']['num_guesses']} right)")
    lines.append(f"empirical epsilon lower bound: {report['epsilon_lower_bound']:.3f} at "
                 f"confidence {report['confidence']}")
  return "\n".join(lines)
