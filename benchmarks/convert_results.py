"""Builds `benchmarks/results/table.json` and `table.csv`: the archived measurements converted
to `benchmarks.schema.Row`s, then the rows of every file in `results/runs/`; then the README's
current table (`benchmarks.report_table`).

  python -m benchmarks.convert_results            # rewrites table.json, table.csv, README table

The archive (`results/archive/`) holds the JSON files of the sessions before the one row format,
in a dozen layouts. Each file that times a DP step against a non-DP step is read by a reader
below: every number of a converted row is a value of that file (peaks: its MiB × 2**20, exact;
DP ÷ non-DP: the quotient of its two rates), and where it lacks a field the row has None. A
commit that a file does not name is taken only where the archived README states it, quoted in
`README_COMMITS` (checked against archive/README.md). A measurement that two files hold (same
configuration, same rates) is kept once, from the first. Files of other measurements are listed
in `DIAGNOSTIC` with why they are not rows.

Order: the archived files in the order they were committed (`git log`; files of one commit:
older code first), each file's measurements in its order, then `runs/` by their rows' date.
`benchmarks.report_table` takes the last plain row per configuration as current.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import pathlib
import re
from typing import Any, Callable, Iterator

from benchmarks import dp_step, scaling, schema, throughput

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OLDER = "older code, run beside the file's change"
STACKED = "per_example=ghost_stacked (perf.ghost_stack_layers, removed since)"


@dataclasses.dataclass
class Measurement:
  """One configuration's measurement in an archived file, in its benchmark's current raw form."""
  raw: dict
  pointers: tuple[str, str]  # JSON pointers of the nondp and dp measurements
  command: str
  commit: str | None = None
  variant: list[str] = dataclasses.field(default_factory=list)
  details: dict = dataclasses.field(default_factory=dict)


def commit_of(text: str | None) -> tuple[str | None, list[str]]:
  """(commit, variant) from an archived file's commit text: "abc1234" or "abc1234 (a remark)"
  name a commit; any other text ("abc1234 without the barrier") names modified code: no commit,
  the text goes to the variant."""
  if text is None:
    return None, []
  found = re.fullmatch(r"([0-9a-f]{7,40})( \(.*\))?", text)
  return (found.group(1), []) if found else (None, [f"code: {text}"])


def _command_variant(raw: dict, command: str) -> list[str]:
  """What a recorded command changes: XLA_FLAGS set in front of it, --quick (a smoke run), and
  --profile where the row does not hold the profile itself (`throughput.to_rows` reads those)."""
  found = re.match(r"(XLA_FLAGS=\S+) ", command)
  flags = command.split()
  return ([found.group(1)] if found else []) + (["quick"] if "--quick" in flags else []) + (
      ["profiled"] if "--profile" in flags and "dp_profile" not in raw else [])


def _one(raw: dict, pointer: str, command: str, text: str | None = None,
         older: bool = False, **details) -> Measurement:
  commit, variant = commit_of(text)
  variant += _command_variant(raw, command) + ([OLDER] if older else [])
  return Measurement(raw, (pointer, pointer), command, commit, variant, details)


# Readers: archived file's JSON -> its measurements.
def _rows(data: dict, commit: str | None = None) -> list[Measurement]:
  """{rows, command[, commit]}: one command for every row."""
  return [_one(raw, f"/rows/{i}", data["command"], data.get("commit", commit))
          for i, raw in enumerate(data["rows"])]


def _matching(raw: dict, commands: list[str]) -> str:
  """The one command of `commands` whose --shapes, --methods, --scans and --clips include the
  row's configuration (the throughput script's defaults where a flag is absent)."""
  def includes(command: str, flag: str, value: Any, default: str) -> bool:
    found = re.search(rf"--{flag}[ =](\S+)", command)
    return str(value) in (found.group(1) if found else default).split(",")
  shape = f"{raw['model']}:{raw['microbatch']}x{raw['microbatches']}"
  found = [c for c in commands if includes(c, "shapes", shape, "") and includes(
      c, "methods", raw["per_example"], "vmap") and includes(c, "scans", raw.get("scan", 0), "0")
      and includes(c, "clips", raw["clip"], "flat")]
  if len(found) != 1:
    raise ValueError(f"{len(found)} of the commands {commands} match the row {shape}.")
  return found[0]


def _commands(data: dict, commit_of_row: Callable[[dict], str | None]) -> list[Measurement]:
  """{rows, commands, commit}: each row's command is the one that matches it."""
  return [_one(raw, f"/rows/{i}", _matching(raw, data["commands"]), commit_of_row(raw))
          for i, raw in enumerate(data["rows"])]


def _labelled_commits(text: str) -> dict[str, str]:
  """"f83471e (ghost rows); b2aae13 (vmap ViT-B row)" -> {label: commit}."""
  return {label: commit for commit, label in re.findall(r"([0-9a-f]{7,40}) \(([^)]*)\)", text)}


def _throughput_h200(data: dict) -> list[Measurement]:
  commits = _labelled_commits(data["commit"])
  return _commands(data, lambda raw: commits["ghost rows"] if raw["per_example"] == "ghost" else
                   commits["vmap ViT-B row"] if raw["model"] == "vit_b16_224" else None)


def _runs(data: dict, older: frozenset = frozenset()) -> list[Measurement]:
  """{runs: [{command, commit or code, rows | row | result: {rows}, note?}]}; a code that names a
  commit in `older` was run beside the file's change; other codes name the change itself."""
  found = []
  for i, run in enumerate(data["runs"]):
    if "row" in run:
      listed = [(f"/runs/{i}/row", run["row"])]
    else:
      key = "result" if "result" in run else "rows"
      rows = run["result"]["rows"] if key == "result" else run["rows"]
      prefix = f"/runs/{i}/result/rows" if key == "result" else f"/runs/{i}/rows"
      listed = [(f"{prefix}/{j}", raw) for j, raw in enumerate(rows)]
    text = run.get("commit", data.get("commit"))
    if "code" in run:  # a commit (older code) or a name of the change (no commit named)
      text = run["code"] if run["code"] in older else None
    for pointer, raw in listed:
      notes = {"note": run["note"]} if "note" in run else {}
      found.append(_one(raw, pointer, run["command"], text,
                        older=text is not None and text in older, **notes))
  return found


def _gram_cap(data: dict) -> list[Measurement]:
  after, before, profiled = data["command"].split("; ")
  copy = re.fullmatch(r"\(([0-9a-f]{7,40}) copy\) (.*)", before)
  return ([_one(raw, f"/after/{i}", after) for i, raw in enumerate(data["after"])]
          + [_one(raw, f"/before/{i}", copy.group(2), copy.group(1), older=True)
             for i, raw in enumerate(data["before"])]
          + [_one(data["after_profiled"], "/after_profiled", profiled)])


def _public_grad(data: dict) -> list[Measurement]:
  commit = re.fullmatch(r"before_([0-9a-f]{7,40})", [k for k in data if k.startswith("before")][0])
  return ([_one(raw, f"/after/{i}", data["command"]) for i, raw in enumerate(data["after"])]
          + [_one(raw, f"/{commit.group(0)}/{i}", data["command"], commit.group(1), older=True)
             for i, raw in enumerate(data[commit.group(0)])])


def _privacy_hardening(data: dict) -> list[Measurement]:
  commands = {call: re.sub(r" \([^()]*\)$", "", text) for call, text in data["commands"].items()}
  return [_one(raw, f"/rows/{i}", commands[raw["call"]], data["commits"][raw["code"]],
               older=raw["code"] == "before", code=raw["code"], call=raw["call"])
          for i, raw in enumerate(data["rows"])]


def _dp_step(data: dict) -> list[Measurement]:
  """{rows: [non_dp, dp, ...]}: a model's two modes, in that order."""
  rows = data["rows"]
  found = []
  for i in range(0, len(rows), 2):
    pair = {r["mode"]: r for r in rows[i:i + 2]}
    if set(pair) != {"non_dp", "dp"} or pair["dp"]["model"] != pair["non_dp"]["model"]:
      raise ValueError(f"rows {i}, {i + 1} are not one model's non_dp and dp rows.")
    found.append(Measurement(pair, (f"/rows/{i}", f"/rows/{i + 1}"), data["command"]))
  return found


# Upgrades: an archived raw measurement -> the keys its benchmark's to_rows reads now.
def _throughput_raw(m: Measurement) -> None:
  raw = m.raw = dict(m.raw)
  after_pieces = raw.pop("peak_memory_mb")
  # A --breakdown row's peak was read after the pieces ran (ghost's extra passes): not the step's.
  raw["dp_peak_memory_bytes"] = None if "pieces" in raw else schema.mb_to_bytes(after_pieces)
  if "pieces" in raw:
    m.details["peak_after_breakdown_bytes"] = schema.mb_to_bytes(after_pieces)
  raw["non_dp_peak_memory_bytes"] = schema.mb_to_bytes(raw.pop("non_dp_peak_memory_mb", None))
  if raw["per_example"] == "ghost_stacked":
    raw["per_example"] = "ghost"
    m.variant.append(STACKED)


def _scaling_raw(m: Measurement) -> None:
  m.raw = dict(m.raw, dp_peak_memory_bytes=schema.mb_to_bytes(
      m.raw["peak_memory_per_device_mb"]))


def _dp_step_raw(m: Measurement) -> None:
  m.raw = {mode: dict(r, peak_memory_bytes=schema.mb_to_bytes(r["peak_memory_mb"]))
           for mode, r in m.raw.items()}


BENCHMARKS = {"throughput": (throughput.to_rows, _throughput_raw),
              "scaling": (scaling.to_rows, _scaling_raw),
              "dp_step": (dp_step.to_rows, _dp_step_raw)}

# (file, benchmark, reader), in the order they were committed.
ARCHIVE: list[tuple[str, str, Callable[[dict], list[Measurement]]]] = [
    ("dp_step_cpu.json", "dp_step", _dp_step),                        # a30b673
    ("dp_step_h100.json", "dp_step", _dp_step),
    ("scaling_h200x2.json", "scaling", _rows),                        # 7497f47
    ("throughput_h100.json", "throughput", _rows),                    # 6b7efef
    ("throughput_h100_ghost_earlier.json", "throughput", _rows),      # 16972bb
    ("throughput_h100_ghost.json", "throughput", _rows),
    ("throughput_h200_before.json", "throughput",                     # a954254
     lambda data: _commands(data, lambda raw: data["commit"])),
    ("throughput_h200.json", "throughput", _throughput_h200),
    ("throughput_h200_profile.json", "throughput", _rows),            # rewritten in f271e53
    ("throughput_cpu_quick.json", "throughput", _rows),               # 1e32951
    ("throughput_h200_suite.json", "throughput", _rows),              # f271e53
    ("throughput_h200_profile_after.json", "throughput", _rows),
    ("throughput_h200_ghost_fusion.json", "throughput", _rows),
    ("throughput_cpu_wrn_before.json", "throughput", _rows),          # a889e70
    ("throughput_cpu_wrn.json", "throughput", _rows),
    ("throughput_h200_wrn_profiles.json", "throughput", _runs),       # c917777
    ("throughput_h200_wrn.json", "throughput", _runs),
    ("throughput_h200_vitb_extra.json", "throughput", _runs),
    ("throughput_h200_noise.json", "throughput", _runs),              # ee774f5
    ("ghost_stacked_h200.json", "throughput", _runs),                 # d5d6a95, at 1636a87
    ("wrn_recheck_h200.json", "throughput",  # "96b6169 (in an untracked folder ...)"
     lambda data: _runs(data, older=frozenset({"96b6169"}))),
    ("batched_reductions_h200.json", "throughput",  # "before (1636a87, run from an untracked copy)"
     lambda data: _runs(data, older=frozenset({"1636a87"}))),
    ("throughput_h200_host.json", "throughput",  # "against d5d6a95 run from an untracked ... copy"
     lambda data: _runs(data, older=frozenset({"d5d6a95"}))),         # d3f90c1
    ("profile_h200_full.json", "throughput", _rows),                  # a08f409
    ("gram_cap_h200.json", "throughput", _gram_cap),                  # 5665da4
    ("public_grad_h200.json", "throughput", _public_grad),            # 3af035b
    ("throughput_h200_vitb_3af035b.json", "throughput", _rows),       # c1c6b45
    ("privacy_hardening_h200.json", "throughput", _privacy_hardening),  # 228aa45
]

# Commits that a file does not name but the archived README states: (commit, its words).
README_COMMITS = {
    "scaling_h200x2.json": ("7497f47", "(the script as of commit 7497f47;"),
    "throughput_h200_profile.json": ("c7ab44a", "`throughput_h200_profile.json` now holds a "
                                                "re-run at c7ab44a"),
    "throughput_cpu_wrn_before.json": ("c7ab44a", "`throughput_cpu_wrn_before.json` at commit "
                                                  "c7ab44a"),
    "throughput_cpu_wrn.json": ("8c90215", "`throughput_cpu_wrn.json` at 8c90215"),
}

# Files of other measurements: archived, not rows.
DIAGNOSTIC = {
    "compile_time_cpu.json": "compile seconds per jitted function (benchmarks.compile_time)",
    "compile_time_h200.json": "compile seconds per jitted function (benchmarks.compile_time)",
    "compile_time_h200_noise.json": "compile seconds per jitted function, per noise draw",
    "cost_cpu.json": "XLA's flops and bytes of the compiled functions (benchmarks.compile_time)",
    "ghost_norm_kernel_probe_h200.json": "one ViT-B block's ghost norms, a Pallas kernel vs XLA",
    "host_dispatch_h200.json": "host time per jitted call (an ad-hoc probe)",
    "max_batch_h200.json": "the largest microbatch and batch that fit (benchmarks.max_batch)",
    "noise_cpu_probes.json": "ad-hoc probes of the noise step's compiled cost",
    "reduction_probe_h200.json": "sibling reductions, separate vs stacked (an ad-hoc probe)",
    "scan_variants_h200.json": "the non-private step alone, unrolled vs scanned blocks",
    "summed_terms_h200.json": "formulations of one term's norm and weighted sum, timed alone",
}


def archive_rows(archive: pathlib.Path) -> list[schema.Row]:
  """The rows of every archived file in `ARCHIVE`, in order (see the module's docstring)."""
  readme = " ".join((archive / "README.md").read_text().split())
  rows: list[schema.Row] = []
  seen: set[tuple] = set()
  for name, benchmark, reader in ARCHIVE:
    to_rows, upgrade = BENCHMARKS[benchmark]
    for run, m in enumerate(reader(json.loads((archive / name).read_text()))):
      if m.commit is None and name in README_COMMITS:
        m.commit, words = README_COMMITS[name]
        if words not in readme:
          raise ValueError(f"archive/README.md does not say {words!r}: fix README_COMMITS.")
      upgrade(m)
      pair = to_rows(m.raw, run=run, sources=tuple(f"archive/{name}#{p}" for p in m.pointers),
                     command=m.command, commit=m.commit, date=None, variant=m.variant,
                     details=m.details)
      key = tuple((r["model"], r["method"], r["clip"], r["dtype"], r["batch"], r["device"],
                   r["examples_per_s"]) for r in pair)
      if key not in seen:  # the same measurement in a later file
        seen.add(key)
        rows += pair
  return rows


def run_rows(runs: pathlib.Path) -> list[schema.Row]:
  """The rows of every `runs/*.json` (as the benchmarks write them), ordered by their first
  row's date, then name; `source` is rewritten to the file's place under results/."""
  files = []
  for path in sorted(runs.glob("*.json")):
    data = json.loads(path.read_text())
    if data.get("format") != schema.FORMAT:
      raise ValueError(f"{path} is not a file of {schema.FORMAT} rows: only the timing "
                       "benchmarks' --out files (throughput, scaling, dp_step) go in runs/.")
    rows = [dict(row, source=f"runs/{path.name}#{row['source'].split('#', 1)[1]}")
            for row in data["rows"]]
    files.append((min((r["date"] or "" for r in rows), default=""), path.name, rows))
  return [row for _, _, rows in sorted(files, key=lambda f: f[:2]) for row in rows]


def build_table(results: pathlib.Path = RESULTS) -> list[schema.Row]:
  """The archive's rows, then the runs' rows, validated; profiles stay in their files."""
  rows = archive_rows(results / "archive") + run_rows(results / "runs")
  for row in rows:
    row["details"].pop("profile", None)
  return schema.validate_table(rows)


def table_json(rows: list[schema.Row]) -> str:
  """table.json's text: one row per line."""
  lines = ",\n".join(json.dumps(row, sort_keys=False) for row in rows)
  return (f'{{"format": "{schema.FORMAT}",\n"generated_by": "python -m '
          f'benchmarks.convert_results",\n"rows": [\n{lines}\n]}}\n')


def table_csv(rows: list[schema.Row]) -> str:
  """table.csv's text: the fields of `schema.Row`, details as JSON."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(schema.FIELDS)
  for row in rows:
    writer.writerow([json.dumps(row[f], sort_keys=True) if f == "details" else
                     "" if row[f] is None else row[f] for f in schema.FIELDS])
  return out.getvalue()


def read_table(results: pathlib.Path = RESULTS) -> list[schema.Row]:
  """table.json's rows, validated."""
  return schema.validate_table(json.loads((results / "table.json").read_text())["rows"])


def files(rows: list[schema.Row]) -> Iterator[tuple[str, str]]:
  """(name, text) of the generated files under results/."""
  yield "table.json", table_json(rows)
  yield "table.csv", table_csv(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--results", default=str(RESULTS), help="the results folder")
  args = parser.parse_args()
  from benchmarks import report_table
  results = pathlib.Path(args.results)
  rows = build_table(results)
  for name, text in files(rows):
    (results / name).write_text(text)
  report_table.update_readme(results / "README.md", rows)
  print(f"{len(rows)} rows -> {results}/table.json, table.csv, README.md")


if __name__ == "__main__":
  main()
