"""dpjax and its peers side by side: one markdown table of every run in several files of
`benchmarks.schema` rows, and the ratios the performance issue asks for (same model, same device).

  python -m benchmarks.peers.table $OUT/dpjax.json $OUT/jax_privacy.json $OUT/opacus.json

No jax or torch import.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Iterable, Sequence

from benchmarks import schema

# benchmark -> (what its DP step is, what its non-private step is)
FRAMEWORKS = {"throughput": ("dpjax", "dpjax"), "scaling": ("dpjax", "dpjax"),
              "dp_step": ("dpjax", "dpjax"), "peers.opacus_vit": ("Opacus", "timm"),
              "peers.jax_privacy_vit": ("jax_privacy", "plain JAX")}
# (what is compared, dpjax's benchmark and mode, the peer's benchmark and mode, the target)
COMPARISONS = (
    ("dpjax DP ÷ Opacus's best DP", ("throughput", "dp"), ("peers.opacus_vit", "dp"), 3.0),
    ("dpjax DP ÷ jax_privacy clipped_grad DP", ("throughput", "dp"),
     ("peers.jax_privacy_vit", "dp"), 1.5),
    ("dpjax non-private ÷ timm non-private", ("throughput", "nondp"),
     ("peers.opacus_vit", "nondp"), None),
)
_HEAD = ("| DP / non-DP step of | model | method | dtype | microbatch × k | device | DP ex/s | non-DP ex/s | "
         "DP ÷ non-DP | DP peak MiB | non-DP peak MiB | DP first-step s | variant |")


def _mib(row: schema.Row | None) -> str:
  if row is None or row["peak_memory_bytes"] is None:
    return "—"
  return f"{row['peak_memory_bytes'] / 2**20:,.0f}"


def _rate(row: schema.Row | None) -> str:
  return "—" if row is None else f"{row['examples_per_s']:,.1f}"


def runs(rows: Iterable[schema.Row]) -> list[tuple[schema.Row | None, schema.Row]]:
  """(dp row or None, nondp row) per run (source file, run index), in the rows' order."""
  found: dict[tuple[str, int], dict[str, schema.Row]] = {}
  for row in rows:
    found.setdefault((schema.source_file(row), row["run"]), {})[row["mode"]] = row
  return [(modes.get("dp"), modes["nondp"]) for modes in found.values()]


def markdown(rows: Sequence[schema.Row]) -> str:
  """A table of one line per run: the DP step beside the non-private one."""
  lines = [_HEAD, "|" + "---|" * _HEAD.count(" | ") + "---|"]
  for dp, nondp in runs(rows):
    shown = dp or nondp
    shape = (f"{dp['microbatch']} × {dp['microbatches']}" if dp else f"{nondp['batch']} × 1")
    ratio = "—" if dp is None else f"{dp['dp_over_non_dp']:.3f}"
    first = "—" if dp is None or dp["compile_s"] is None else f"{dp['compile_s']:.1f}"
    lines.append(
        f"| {' / '.join(dict.fromkeys(FRAMEWORKS[shown['benchmark']]))} | {shown['model']} | {shown['method'] or '-'} | "
        f"{shown['dtype']} | {shape} | {shown['device']} | {_rate(dp)} | {_rate(nondp)} | "
        f"{ratio} | {_mib(dp)} | {_mib(nondp)} | {first} | {shown['variant'] or ''} |")
  return "\n".join(lines)


def _fastest(rows: Sequence[schema.Row], benchmark: str, mode: str,
             model: str) -> schema.Row | None:
  found = [r for r in rows if (r["benchmark"], r["mode"], r["model"]) == (benchmark, mode, model)]
  return max(found, key=lambda r: r["examples_per_s"], default=None)


def comparisons(rows: Sequence[schema.Row]) -> list[str]:
  """One line per comparison of `COMPARISONS` that the rows allow, per model: the fastest row of
  each side (any batch, method or variant among the given rows: give the files of one GPU
  command, whose devices the line names) and their ratio."""
  lines = []
  for model in sorted({r["model"] for r in rows}):
    for what, ours, theirs, target in COMPARISONS:
      a, b = (_fastest(rows, *side, model) for side in (ours, theirs))
      if a is None or b is None:
        continue
      goal = f" (target ≥ {target:g}×)" if target else ""
      lines.append(f"- {model}: {what} = {a['examples_per_s']:,.1f} / "
                   f"{b['examples_per_s']:,.1f} = {a['examples_per_s'] / b['examples_per_s']:.2f}×"
                   f"{goal}; {_describe(a)} vs {_describe(b)}")
  return lines


def _describe(row: schema.Row) -> str:
  method = f"{row['method']}, " if row["method"] else ""
  name = FRAMEWORKS[row["benchmark"]][row["mode"] == "nondp"]
  return f"{name} ({method}batch {row['batch']}, {row['device']})"


def read_rows(paths: Iterable[str]) -> list[schema.Row]:
  """The validated rows of each file (a benchmark's --out JSON), in order."""
  rows: list[schema.Row] = []
  for path in paths:
    data = json.loads(pathlib.Path(path).read_text())
    if data.get("format") != schema.FORMAT:
      raise ValueError(f"{path} is not a file of {schema.FORMAT} rows (a benchmark's --out).")
    rows += schema.validate_table(data["rows"])
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("files", nargs="+", help="JSON files of rows (missing files are skipped)")
  args = parser.parse_args()
  present = [f for f in args.files if pathlib.Path(f).exists()]
  for f in sorted(set(args.files) - set(present)):
    print(f"(no {f}: that part wrote no rows)")
  rows = read_rows(present)
  print(markdown(rows))
  print("\n".join(["", "Ratios (fastest row of each side):"] + comparisons(rows)))


if __name__ == "__main__":
  main()
