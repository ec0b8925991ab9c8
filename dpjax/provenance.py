"""Where a result came from: the code's commit, the devices and the date.

`results.json` (`provenance`) and the benchmarks' rows record them, so that a committed result
names the code that produced it. All of it is public: nothing here reads data or the run's
secret.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
from typing import Any

COMMIT_ENV = "DPJAX_COMMIT"
_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]


def code_commit() -> str | None:
  """$DPJAX_COMMIT if set (a copy without .git, as on the device machine: pass it there), else
  the short HEAD of the checkout dpjax is imported from, with "-dirty" when tracked files differ
  from it; None without either (an installed dpjax, or no git)."""
  given = os.environ.get(COMMIT_ENV, "").strip()
  if given:
    return given
  git = ["git", "-C", str(_CHECKOUT)]
  try:
    head = subprocess.run(git + ["rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(git + ["diff", "--quiet", "HEAD"], capture_output=True).returncode
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("-dirty" if dirty else "") if head else None


def now() -> str:
  """The UTC date and time, ISO 8601 to the second."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_provenance() -> dict[str, Any]:
  """{commit, date, device (the first device's kind), devices (how many), jax} of this process."""
  import jax
  return dict(commit=code_commit(), date=now(), device=jax.devices()[0].device_kind,
              devices=jax.device_count(), jax=jax.__version__)
