"""One run per workdir, and config values that would lose checkpoints refused before any work."""

import subprocess
import sys
import time

import pytest

from dpjax import config as config_lib
from dpjax.train import loop, workdir_lock
from tests.e2e_test import small_config

_HOLD = """
import sys, time
from dpjax.train import workdir_lock
with workdir_lock.WorkdirLock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(60)
"""


def test_a_second_run_on_a_held_workdir_is_refused_at_once_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    started = time.time()
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid}"):
      loop.train_and_evaluate(small_config(), str(tmp_path), show_progress=False)
    assert time.time() - started < 5  # refused before loading data or compiling
  finally:
    holder.kill()
    holder.wait()
  with workdir_lock.WorkdirLock(str(tmp_path)):  # the kernel dropped the killed holder's lock
    with pytest.raises(workdir_lock.WorkdirLockedError, match="in use by another run"):
      with workdir_lock.WorkdirLock(str(tmp_path)):
        pass
  with workdir_lock.WorkdirLock(str(tmp_path)):  # released on exit
    pass


@pytest.mark.parametrize("block,field,value", [
    ("checkpoint", "max_to_keep", 0), ("checkpoint", "every_steps", 0),
    ("eval", "every_steps", 0), ("eval", "batch_size", -1), (None, "log_every_steps", 0)])
def test_intervals_and_checkpoint_counts_must_be_positive_integers(block, field, value):
  c = config_lib.default_config()
  c.dp.noise_multiplier = 1.0
  (c[block] if block else c)[field] = value
  with pytest.raises(ValueError, match=f"{field} must be an integer > 0"):
    config_lib.validate(c)
