"""Entry point: python -m dpjax.main --config=experiments/<name>.py[:arg] --workdir=DIR.

Rerunning the same command resumes from the latest checkpoint in DIR. Multi-process runs
(launch/multiprocess.py, launch/slurm.sbatch, launch/tpu_pod.sh) run this same command in every
process; jax.distributed is started first (see `dpjax.parallel.initialize_distributed`).

`--help` lists the flags and every config key with its default and meaning.

Exit status: 0 when training ended (completed, or stopped by the privacy budget); 75 (EX_TEMPFAIL)
when SIGTERM/SIGINT stopped it after saving a checkpoint: rerun the same command to resume;
1 with an error message otherwise (a non-finite step: `faults.NonFiniteError`).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dpjax import config as config_lib
from dpjax import parallel
from dpjax.train import contrastive_loop, faults, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  parallel.initialize_distributed(**_CONFIG.value.distributed)
  if "contrastive" in _CONFIG.value:  # experiments/contrastive.py
    results = contrastive_loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _PROGRESS.value)
    if results["stopped"] == "preempted":
      sys.exit(faults.EXIT_PREEMPTED)
    print(f"method {results['method']}  epsilon {results['privacy']['epsilon']:.3f}  linear probe "
          + ", ".join(f"{k} {v['test_accuracy']:.4f}" for k, v in results["probe"].items()))
    return
  results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _PROGRESS.value)
  if results["stopped"] == "preempted":  # checkpoint saved: the same command resumes
    sys.exit(faults.EXIT_PREEMPTED)
  if parallel.is_main_process():
    print(f"test accuracy {results['test_accuracy']:.4f}  "
          f"epsilon {results['privacy']['epsilon']:.3f}  steps {results['steps']}  "
          f"({results['stopped']})")


_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
_HELP_FULL = ("--helpfull", "-helpfull")


def usage(full: bool = False) -> str:
  """This command's help: what it does, its flags (every module's when `full`) and the config
  keys grouped by block, with their defaults and meanings."""
  flag_help = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
  return f"{__doc__.strip()}\n\nflags:\n{flag_help}\n\n{config_lib.help_text()}"


def run(argv: list[str]) -> None:
  """`app.run(main)`, except that --help and --helpfull print `usage` and exit 0 (absl's own
  help flags exit 1 and list no config key)."""
  asked = set(argv[1:])
  if asked & set(_HELP + _HELP_FULL):
    print(usage(full=bool(asked & set(_HELP_FULL))))
    sys.exit(0)
  app.run(main, argv)


if __name__ == "__main__":
  run(sys.argv)
