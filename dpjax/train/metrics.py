"""Metrics sinks: JSON lines and TensorBoard event files in the workdir, and a progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import tqdm


def _plain(value: Any) -> Any:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return value
  return value if math.isfinite(value) else str(value)


class MetricsWriter:
  """Writes `workdir/metrics.jsonl` (one JSON object per record) and TensorBoard events.

  enabled=False (every process but process 0 of a multi-process run) writes nothing.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True,
               resume_step: int | None = None):
    """resume_step: the step a resumed run starts from. Records of later steps (written after
    the checkpoint it resumes, by the run that stopped) are dropped from metrics.jsonl, and
    TensorBoard purges its events from resume_step + 1 on: the resumed run writes them again, once.
    """
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      _drop_records_after(path, resume_step)
    self._jsonl = open(path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=None if not resume_step else resume_step + 1)

  def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "kind") and isinstance(v, float):
          self._tb.add_scalar(f"{kind}/{k}", v, int(step))

  def close(self) -> None:
    if not self._enabled:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without the records of steps after `step`, and its "perf" record at
  `step` (atomically)."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  def kept_line(record):  # a resumed run writes its "perf" record at its first step again
    return record["step"] < step or (record["step"] == step and record["kind"] != "perf")
  kept = [line for line in lines if kept_line(json.loads(line))]
  if len(kept) == len(lines):
    return
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir`'s metrics.jsonl as written: non-finite values stay the strings
  "nan", "inf", "-inf" (JSON has no such numbers; `as_number` turns them back), so two runs'
  records compare equal when they wrote the same."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def as_number(value: Any) -> Any:
  """A value as `read_metrics` returns it, with the writer's "nan", "inf" and "-inf" back as
  floats (the inverse of `_plain`)."""
  return float(value) if value in ("nan", "inf", "-inf") else value


class Progress:
  """A progress bar over steps showing loss, accuracy, ε spent and α."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self.enabled = enabled
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr,
                          dynamic_ncols=True, mininterval=1.0)

  def update(self, n: int = 1, **shown: Any) -> None:
    if shown:
      self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                             for k, v in shown.items()}, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    self._bar.close()
