"""Runs a grid of variants of one experiment, then tabulates and plots their results.

  python launch/sweep.py --config=experiments/fmnist_continual.py:dp --workdir=sweeps/switch \\
      --sweep=mixing.switch_step=0,100,200 --sweep=dp.target_epsilon=1,3,8 \\
      [--set=schedule.total_steps=600 ...] [--baseline=private_only=DIR ...] \\
      [--x=mixing.switch_step --group=dp.target_epsilon] [--capture] [--parallel=N] \\
      [--start_before=UNIX_TIME] [--print_commands | --collect_only]

A --set value may hold {KEY}, the value of a swept KEY in each variant (`sweeps.fill`):
--sweep=seed=0,1,2 --set=finetune.init_from=W/pretrain/seed={seed} starts each seed's
fine-tuning from the pre-training of the same seed.

Several --config flags run each config's variants (folders prefixed by its arg, e.g.
WORKDIR/public_only,B,seed=1): one command for a figure's baselines. --config_in_name prefixes
them with one --config too, so that a command running a subset of the configs finds (and skips)
the folders of an earlier one.

Each variant (the product of the --sweep axes; --set applies to all) trains in WORKDIR/<name>,
e.g. WORKDIR/switch_step=100,target_epsilon=3, one after another or --parallel at a time
(--capture: show a run's output only if it fails); rerunning skips finished variants and
resumes unfinished ones. --start_before starts no run after that time (a device call with a
time limit then ends with finished runs; the rest are listed as not started). Then
WORKDIR/results.csv, WORKDIR/accuracy.png (test accuracy vs --x, one line per --group value,
baselines as horizontal lines) and, if the runs logged curvature records, WORKDIR/curvature.png
are written and a markdown table is printed.
--print_commands prints one shell command per variant (for a cluster) and runs nothing; it writes
each variant's variant.json so that --collect_only (same flags) can tabulate the results later.
"""

import os
import shlex

from absl import app, flags

from dpjax import report, sweeps

_CONFIG = flags.DEFINE_multi_string("config", [], "Experiment config, as for dpjax.main "
                                    "(path[:arg]); several: each one's variants, in folders "
                                    "named after its arg first.")
_CONFIG_IN_NAME = flags.DEFINE_bool("config_in_name", False, "Name the folders after the "
                                    "config's arg with one --config too, so that they do not "
                                    "depend on how many configs a command runs.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder: one subfolder per variant.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "An axis KEY=V1,V2,... of config overrides.")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every variant; "
                                 "{KEY2} in VALUE is the variant's value of a swept KEY2.")
_BASELINE = flags.DEFINE_multi_string("baseline", [], "NAME=DIR: a finished run's accuracy, "
                                      "drawn as a horizontal line.")
_X = flags.DEFINE_string("x", None, "Swept key on the x axis (default: the first --sweep key).")
_GROUP = flags.DEFINE_string("group", None, "Swept key with one line per value (default: the "
                             "second --sweep key, if any).")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print the commands and run nothing.")
_COLLECT = flags.DEFINE_bool("collect_only", False, "Only re-collect the results and re-plot.")
_CAPTURE = flags.DEFINE_bool("capture", False, "Capture each run's output (shown if it fails).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (> 1: each run's output goes to "
                                 "WORKDIR/<name>.log, each takes 1/N of the GPU's memory).")
_START_BEFORE = flags.DEFINE_float("start_before", None, "Unix time after which no run starts (the "
                                   "ones started finish), e.g. $(( $(date +%s) + 300 )) on a "
                                   "device call of 540 s whose runs take under 240 s.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if any("=" not in b for b in _BASELINE.value):
    raise app.UsageError(f"--baseline takes NAME=DIR, got {_BASELINE.value}.")
  variants = sweeps.expand(_SWEEP.value)
  if not _COLLECT.value:
    if not _CONFIG.value:
      raise app.UsageError("--config is required unless --collect_only.")
    if any("=" not in kv for kv in _SET.value):
      raise app.UsageError(f"--set takes KEY=VALUE, got {_SET.value}.")
    extra = [f"--config.{kv}" for kv in _SET.value] + ["--progress=false"]
    cmds = []
    for config in _CONFIG.value:
      named = len(_CONFIG.value) > 1 or _CONFIG_IN_NAME.value
      prefix = config.partition(":")[2] if named else ""
      config_cmds = sweeps.commands(config, _WORKDIR.value, variants, extra, prefix)
      sweeps.write_variants(config, config_cmds, variants)
      cmds += config_cmds
    if _PRINT.value:
      print("\n".join(shlex.join(cmd) for cmd in cmds))
      return
    try:
      not_started = sweeps.run_local(cmds, capture=_CAPTURE.value, parallel=_PARALLEL.value,
                                     start_before=_START_BEFORE.value)
    except sweeps.SweepError as e:
      raise SystemExit(f"SweepError: {e}") from None
    if not_started:
      print(f"{len(not_started)} variants not started (past --start_before): rerun the same "
            "command to run them.", flush=True)
  swept = list(variants[0])
  x = _X.value or (swept[0] if swept else None)
  if x is None:
    raise app.UsageError("Pass --x (and --group), or the --sweep flags the sweep was run with.")
  group = _GROUP.value or next((k for k in swept if k != x), None)
  report_sweep(_WORKDIR.value, x, group, dict(b.split("=", 1) for b in _BASELINE.value))


def report_sweep(workdir: str, x: str, group: str | None, baselines: dict[str, str]) -> None:
  """Writes results.csv, accuracy.png and curvature.png (if any) and prints a markdown table."""
  rows = sweeps.collect(workdir)
  if not rows:
    raise SystemExit(f"No finished variant (results.json) under {workdir}.")
  csv_path, accuracy_png = (os.path.join(workdir, f) for f in ("results.csv", "accuracy.png"))
  sweeps.write_csv(rows, csv_path)
  lines = {name: report.load_results(run)["test_accuracy"] for name, run in baselines.items()}
  sweeps.plot_accuracy(rows, x, group, accuracy_png, lines)
  print(f"\n{csv_path}\n{accuracy_png}")
  if sweeps.plot_curves(rows, None, os.path.join(workdir, "curvature.png")):
    print(os.path.join(workdir, "curvature.png"))
  print("\n" + report.results_table([row["workdir"] for row in rows]))
  for name, accuracy in lines.items():
    print(f"baseline {name}: test accuracy {accuracy:.4f} ({baselines[name]})")


if __name__ == "__main__":
  app.run(main)
