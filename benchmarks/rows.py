"""One benchmark configuration per subprocess: run it, read its JSON row, write the table's JSON.

Each benchmark's `main` runs every configuration as `python -m benchmarks.NAME --internal flags`
in a fresh process (its own peak memory, compile caches and XLA_FLAGS), which prints its row as
the last line of stdout. The timing benchmarks write rows of `benchmarks.schema.Row`
(`write_table`); the diagnostic ones their own rows (`write_rows`). No jax import here: the
parent process never starts a backend.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from typing import Mapping

from benchmarks import schema


def run_row(module: str, flags: list[str], config: Mapping, env: Mapping | None = None) -> dict:
  """Runs `python -m module *flags` and returns the JSON row it printed last; if it fails, prints
  the end of its stderr and returns `config` with the exception line under "failed"."""
  done = subprocess.run([sys.executable, "-m", module] + flags, capture_output=True, text=True,
                        env=dict(os.environ if env is None else env))
  if done.returncode:
    print(f"FAILED {dict(config)}:\n{done.stderr[-3000:]}", file=sys.stderr)
    return dict(config, failed=failure(done.stderr))
  return json.loads(done.stdout.strip().splitlines()[-1])


def failure(stderr: str) -> str:
  """The exception line of a failed configuration's stderr (JAX appends notes after it)."""
  lines = [line for line in stderr.strip().splitlines() if line.strip()] or ["(no stderr)"]
  found = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
  return (found or lines)[-1][:500]


def write_rows(path: str, module: str, rows: list[dict], fmt: str | None = None,
               commit: str = "") -> None:
  """Writes {rows, command, host} to `path` (nothing when empty); called after every row, so a
  run cut short keeps what it measured. With `fmt`, also {format, commit, date}
  (`schema.provenance(commit)`)."""
  if path:
    record = dict(rows=rows, command=command(module), host=platform.node())
    if fmt:
      record.update(format=fmt, **schema.provenance(commit))
    with open(path, "w") as f:
      json.dump(record, f, indent=2)


def add_output_flags(parser) -> None:
  """--out (the JSON file of rows) and --commit, which every timing benchmark takes."""
  parser.add_argument("--out", default="")
  parser.add_argument("--commit", default="",
                      help="the commit measured (default: git's HEAD; needed where no .git is)")


def command(module: str) -> str:
  """This process's command line, as `python -m module ...`."""
  return f"python -m {module} " + " ".join(sys.argv[1:])


def environment_variant() -> list[str]:
  """The part of a row's `variant` set by this process's environment: XLA_FLAGS, if any."""
  flags = os.environ.get("XLA_FLAGS", "").strip()
  return [f"XLA_FLAGS={flags}"] if flags else []


def write_table(path: str, module: str, rows: list[schema.Row], failed: list[dict]) -> None:
  """Writes {format, command, host, rows, failed} to `path` (nothing when empty): `rows` are
  validated `schema.Row`s, `failed` the configurations that failed (`run_row`'s "failed" rows).
  Called after every configuration, so a run cut short keeps what it measured."""
  schema.validate_table(rows)
  if path:
    with open(path, "w") as f:
      json.dump(dict(format=schema.FORMAT, command=command(module), host=platform.node(),
                     rows=rows, failed=failed), f, indent=2)
