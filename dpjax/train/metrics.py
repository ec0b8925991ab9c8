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

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A progress bar over steps showing loss, accuracy, ε spent and α."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, file=sys.stderr,
                          dynamic_ncols=True, mininterval=1.0)

  def update(self, n: int = 1, **shown: Any) -> None:
    if shown:
      self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                             for k, v in shown.items()}, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    self._bar.close()
