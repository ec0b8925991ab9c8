"""The one row format of every DP-vs-non-DP timing (`throughput`, `scaling`, `dp_step`) and of
`benchmarks/results/table.json`.

One measurement of a configuration gives two rows that share `run` (and the file of `source`):
the non-private step's ("nondp") and the DP step's ("dp"), timed in the same process (`dp_step`:
in two processes of one command). The DP row carries DP ex/s ÷ the non-DP row's ex/s. Fields a
measurement did not take are None, never guessed. No jax import: the converter and the report
read rows without a backend.
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Any, Iterable, Mapping, TypedDict

FORMAT = "dpjax-benchmark-rows/1"  # the "format" key of a file of rows
# dpjax's timing benchmarks, then the peers timed on the same model (`benchmarks/peers/`)
BENCHMARKS = ("throughput", "scaling", "scaling_trainer", "dp_step", "peers.opacus_vit",
              "peers.jax_privacy_vit")
MODES = ("dp", "nondp")
# vmap: per-example gradients instantiated by vectorisation (dpjax, jax_privacy's clipped_grad);
# ghost: norms from layer inputs and output gradients (dpjax, Opacus "ghost"); hooks, functorch,
# ew: Opacus's other grad_sample_mode names
METHODS = ("vmap", "ghost", "hooks", "functorch", "ew")
CLIPS = ("flat", "automatic", "per_layer")
DTYPES = ("bfloat16", "float32")


class Row(TypedDict):
  benchmark: str            # the script that measured it, one of BENCHMARKS (a peer's names the
                            # framework: details["framework"] holds its versions)
  model: str                # the script's model key (`harness.MODELS`, `dp_step.MODELS`; the
                            # peers: the harness key of the architecture they time)
  mode: str                 # "dp" or "nondp"
  method: str | None        # dp: the per-example method (METHODS); nondp: None
  clip: str | None          # dp: the clip rule (CLIPS); nondp: None
  dtype: str                # compute dtype of both steps
  microbatch: int           # examples per microbatch (global, over the mesh); nondp: the batch
  microbatches: int         # microbatches per step; nondp: 1
  batch: int                # = microbatch × microbatches
  mesh: str                 # "DATAxFSDP" devices; "1x1" on one device
  device: str               # jax's device_kind, e.g. "NVIDIA H200", "cpu"
  commit: str | None        # the code measured (7-40 hex digits, "-dirty" if uncommitted edits)
  date: str | None          # when it was measured (UTC, ISO 8601); None for archived rows
  examples_per_s: float     # median over timing windows
  dp_over_non_dp: float | None  # dp: its examples_per_s ÷ its run's nondp row's; nondp: None
  peak_memory_bytes: int | None  # allocator peak (max over the mesh's devices; CPU: max RSS)
  compile_s: float | None   # the step's first call minus a timed step
  variant: str | None       # what differs from the script's default measurement (scanned blocks,
                            # XLA_FLAGS, a profile, older or modified code, ...); None: plain
  command: str              # the command that produced it, as recorded
  source: str               # "FILE#POINTER": the file (relative to benchmarks/results/) and the
                            # JSON pointer of the measurement in it
  run: int                  # the configuration's index in that file: pairs dp with nondp
  details: dict[str, Any]   # the script's other measurements (step_ms, dispatch_ms, pieces, ...)


FIELDS: tuple[str, ...] = tuple(Row.__annotations__)
_HASH = re.compile(r"[0-9a-f]{7,40}(-dirty)?")
_MESH = re.compile(r"[1-9]\d*x[1-9]\d*")
_SOURCE = re.compile(r"[^#\s]+#/\S*")


class SchemaError(ValueError):
  """A row that does not follow `Row`."""


def validate(row: Mapping[str, Any]) -> Row:
  """Returns `row` if it follows `Row`, else raises SchemaError naming the field."""
  fields = set(row)
  if fields != set(FIELDS):
    raise SchemaError(f"row fields differ from benchmarks.schema.Row: missing "
                      f"{sorted(set(FIELDS) - fields)}, unknown {sorted(fields - set(FIELDS))}. "
                      "Build rows with benchmarks.schema.pair_rows.")
  where = f"row {row.get('source')} ({row.get('mode')})"

  def check(ok: bool, field: str, want: str) -> None:
    if not ok:
      raise SchemaError(f"{where}: {field}={row[field]!r}; expected {want}.")
  _enum = lambda field, values: check(row[field] in values, field, f"one of {values}")
  _text = lambda field: check(isinstance(row[field], str) and bool(row[field].strip()), field,
                              "a non-empty string")
  _count = lambda field: check(type(row[field]) is int and row[field] > 0, field,
                               "a positive int")
  _enum("benchmark", BENCHMARKS)
  _enum("mode", MODES)
  _enum("dtype", DTYPES)
  for field in ("model", "device", "command"):
    _text(field)
  for field in ("microbatch", "microbatches", "batch"):
    _count(field)
  check(row["batch"] == row["microbatch"] * row["microbatches"], "batch",
        "microbatch × microbatches")
  check(isinstance(row["mesh"], str) and bool(_MESH.fullmatch(row["mesh"])), "mesh",
        "'DATAxFSDP', e.g. '1x1'")
  check(isinstance(row["source"], str) and bool(_SOURCE.fullmatch(row["source"])), "source",
        "'FILE#/json/pointer'")
  check(type(row["run"]) is int and row["run"] >= 0, "run", "an int >= 0")
  check(row["commit"] is None or (isinstance(row["commit"], str)
                                  and bool(_HASH.fullmatch(row["commit"]))), "commit",
        "None or a commit hash (7-40 hex digits, optionally '-dirty')")
  check(row["date"] is None or _is_date(row["date"]), "date", "None or an ISO 8601 time")
  check(_positive(row["examples_per_s"]), "examples_per_s", "a finite float > 0")
  check(row["peak_memory_bytes"] is None or (type(row["peak_memory_bytes"]) is int
                                             and row["peak_memory_bytes"] > 0),
        "peak_memory_bytes", "None or an int > 0")
  check(row["compile_s"] is None or _positive(row["compile_s"], 0.0), "compile_s",
        "None or a finite float >= 0")
  check(row["variant"] is None or (isinstance(row["variant"], str) and row["variant"].strip()),
        "variant", "None or a non-empty string")
  check(isinstance(row["details"], dict), "details", "a dict")
  if row["mode"] == "dp":
    _enum("method", METHODS)
    _enum("clip", CLIPS)
    check(_positive(row["dp_over_non_dp"]), "dp_over_non_dp", "a finite float > 0 on a dp row")
  else:
    for field in ("method", "clip", "dp_over_non_dp"):
      check(row[field] is None, field, "None on a nondp row")
    check(row["microbatches"] == 1, "microbatches", "1 on a nondp row (one batch per step)")
  return row  # type: ignore[return-value]


def source_file(row: Mapping[str, Any]) -> str:
  """The file part of a row's `source`."""
  return row["source"].split("#", 1)[0]


def validate_table(rows: Iterable[Mapping[str, Any]]) -> list[Row]:
  """Validates each row, and that each run has one nondp row and at most one dp row, whose
  dp_over_non_dp is its examples_per_s ÷ the nondp row's (relative error < 1e-9)."""
  rows = [validate(row) for row in rows]
  runs: dict[tuple[str, int], dict[str, Row]] = {}
  for row in rows:
    modes = runs.setdefault((source_file(row), row["run"]), {})
    if row["mode"] in modes:
      raise SchemaError(f"two {row['mode']} rows for run {row['run']} of {source_file(row)}: "
                        "each configuration's measurement needs its own run index.")
    modes[row["mode"]] = row
  for (file, run), modes in runs.items():
    if "nondp" not in modes:
      raise SchemaError(f"run {run} of {file} has no nondp row to compare its dp row with.")
    if "dp" in modes:
      dp, nondp = modes["dp"], modes["nondp"]
      ratio = dp["examples_per_s"] / nondp["examples_per_s"]
      if abs(dp["dp_over_non_dp"] / ratio - 1) > 1e-9:
        raise SchemaError(f"run {run} of {file}: dp_over_non_dp {dp['dp_over_non_dp']} is not "
                          f"{dp['examples_per_s']} / {nondp['examples_per_s']} = {ratio}.")
  return rows


def pair_rows(shared: Mapping[str, Any], nondp: Mapping[str, Any],
              dp: Mapping[str, Any] | None) -> list[Row]:
  """The validated rows of one run: `shared` holds the fields common to both (benchmark, model,
  dtype, mesh, device, commit, date, variant, command, run); `nondp` and `dp` the rest
  (microbatch, microbatches, examples_per_s, peak_memory_bytes, compile_s, details, source; dp:
  method, clip). dp_over_non_dp is computed here. `dp` None: a run of the non-DP step alone."""
  base = dict(shared, method=None, clip=None, dp_over_non_dp=None)
  rows = [dict(base, **nondp, mode="nondp", microbatches=1)]
  if dp is not None:
    rows.append(dict(base, **dp, mode="dp",
                     dp_over_non_dp=dp["examples_per_s"] / nondp["examples_per_s"]))
  for row in rows:
    row["batch"] = row["microbatch"] * row["microbatches"]
  return [validate({**{field: row[field] for field in FIELDS if field in row}, **row})
          for row in rows]


def mode_fields(raw: Mapping[str, Any], name: str, source: str, details: Mapping[str, Any],
                extra_details: Iterable[str] = ()) -> dict[str, Any]:
  """A mode's fields for `pair_rows` from a timing benchmark's measurement, whose keys of step
  `name` ("dp", "non_dp") are prefixed: examples_per_s, compile_s, peak_memory_bytes (absent:
  None); details: `details` + step_ms, dispatch_ms and `extra_details`, where present."""
  found = {key: raw[f"{name}_{key}"] for key in ("step_ms", "dispatch_ms", *extra_details)
           if f"{name}_{key}" in raw}
  return dict(examples_per_s=raw[f"{name}_examples_per_s"], source=source,
              compile_s=raw.get(f"{name}_compile_s"),
              peak_memory_bytes=raw.get(f"{name}_peak_memory_bytes"),
              details={**details, **found})


def mb_to_bytes(mb: float | None) -> int | None:
  """Bytes from the MiB the benchmarks used to write (bytes / 2**20: exact in float64); raises if
  `mb` is not a whole number of bytes, i.e. not a value they wrote."""
  if mb is None:
    return None
  value = mb * 2**20
  if value != round(value):
    raise ValueError(f"{mb} MiB is not a whole number of bytes: not a peak the benchmarks wrote.")
  return int(round(value))


def provenance(commit: str = "") -> dict[str, str | None]:
  """{commit, date} for rows measured now: `commit` if given, else `dpjax.provenance.code_commit`
  ($DPJAX_COMMIT, or the checkout's HEAD with "-dirty" when tracked files differ; None without
  either: on the device machine pass --commit or set DPJAX_COMMIT)."""
  from dpjax import provenance as provenance_lib
  return dict(commit=commit or provenance_lib.code_commit(), date=provenance_lib.now())


def _positive(value: Any, allowed: float | None = None) -> bool:
  """A finite float > 0 (or equal to `allowed`)."""
  return isinstance(value, float) and math.isfinite(value) and (value > 0 or value == allowed)


def _is_date(value: Any) -> bool:
  try:
    return isinstance(value, str) and datetime.datetime.fromisoformat(value) is not None
  except ValueError:
    return False
