"""Entry point: python -m dpjax.main --config=experiments/<name>.py[:arg] --workdir=DIR.

Rerunning the same command resumes from the latest checkpoint in DIR. Multi-process runs
(launch/multiprocess.py, launch/slurm.sbatch, launch/tpu_pod.sh) run this same command in every
process; jax.distributed is started first (see `dpjax.parallel.initialize_distributed`).

Exit status: 0 when training ended (completed, or stopped by the privacy budget); 75 (EX_TEMPFAIL)
when SIGTERM/SIGINT stopped it after saving a checkpoint: rerun the same command to resume;
1 with an error message otherwise (a non-finite step: `faults.NonFiniteError`).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


if __name__ == "__main__":
  app.run(main)
