"""One run per workdir: an advisory lock that a second run on the same workdir meets at once.

Two runs writing one workdir would overwrite each other's checkpoints, metrics and results (and
both could print "completed" while only one's files survive). The run's process 0 holds an
exclusive `flock` on `workdir/.lock` for as long as it trains; the file names the holder (host,
pid, start time) so the refusal can say who it is. The kernel drops the lock when the holder
exits, however it exits, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir): ...` holds `workdir/.lock` or raises
  WorkdirLockedError naming the run that holds it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), ".lock")
    self._file = None

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "an unknown process"
      f.close()
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by another run ({holder}). Wait for it to "
          "finish, stop it, or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def for_this_process(workdir: str, is_main: bool) -> contextlib.AbstractContextManager:
  """The workdir's lock on a run's process 0 (the one that writes the workdir's files), nothing
  on the others (they share the workdir of process 0 and must not refuse each other)."""
  return WorkdirLock(workdir) if is_main else contextlib.nullcontext()
