"""The performance targets (one H200, bf16 compute, AdamW, flat clipping) against the current rows
of `table.json`: the table that opens `benchmarks/results/README.md` (`benchmarks.report_table`).

A target of dpjax alone reads the current plain rows (`report_table.current`) of one device kind.
A ratio of two frameworks compares rows measured in one call (`benchmarks/peers/run_peers.sh`: the
same device, dates less than `SAME_CALL` apart), so it reads every plain run (`Target.history`): a
later dpjax row from another call does not hide the last call that measured both. A target no
such rows measure is "not measured", never guessed. The largest-batch targets (DP ≥ 0.9 × the
non-private batch at 384² and for ViT-L) are `benchmarks.max_batch`'s, whose JSON is not in
table.json. No jax import.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Callable, Sequence

from benchmarks import schema

DEVICE = "NVIDIA H200"
SAME_CALL = datetime.timedelta(minutes=30)
Pair = tuple[schema.Row, schema.Row]  # (dp, nondp) of one run


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  needed: str                                  # e.g. "≥ 3,000"
  met: Callable[[float], bool]
  measure: Callable[[Sequence[Pair]], tuple[float, list[schema.Row]] | None]  # value, its rows
  unit: str = ""
  history: bool = False  # measured over every plain run, not only the current rows


def _eligible(pairs: Sequence[Pair], benchmark: str, model: str) -> list[Pair]:
  return [(dp, nondp) for dp, nondp in pairs
          if dp["benchmark"] == benchmark and dp["model"] == model and dp["device"] == DEVICE
          and dp["mesh"] == "1x1" and dp["dtype"] == "bfloat16" and dp["clip"] == "flat"]


def _fastest(pairs: Sequence[Pair], benchmark: str, model: str) -> Pair | None:
  found = _eligible(pairs, benchmark, model)
  return max(found, key=lambda pair: pair[0]["examples_per_s"]) if found else None


def _own(model: str, value: Callable[[Pair], float]):
  """A measure of dpjax's own fastest DP run of `model` (`benchmarks.throughput`)."""
  def measure(pairs):
    pair = _fastest(pairs, "throughput", model)
    return None if pair is None else (value(pair), list(pair))
  return measure


def _when(row: schema.Row) -> datetime.datetime | None:
  return None if row["date"] is None else datetime.datetime.fromisoformat(row["date"])


def _same_call(a: schema.Row, b: schema.Row) -> bool:
  ta, tb = _when(a), _when(b)
  return ta is not None and tb is not None and abs(ta - tb) < SAME_CALL


def _against(peer: str, value: Callable[[Pair, Pair], float]):
  """A measure comparing dpjax's fastest ViT-B/16 run with `peer`'s fastest of the same call."""
  def measure(pairs):
    best = None
    for theirs in _eligible(pairs, peer, "vit_b16_224"):
      ours = [p for p in _eligible(pairs, "throughput", "vit_b16_224")
              if _same_call(p[0], theirs[0])]
      if ours:
        pair = (max(ours, key=lambda p: p[0]["examples_per_s"]), theirs)
        if best is None or pair[1][0]["examples_per_s"] > best[1][0]["examples_per_s"]:
          best = pair
    return None if best is None else (value(*best), [best[0][0], best[1][0]])
  return measure


TARGETS = (
    Target("ViT-B/16 224² DP examples/s", "≥ 3,000", lambda v: v >= 3000,
           _own("vit_b16_224", lambda p: p[0]["examples_per_s"])),
    Target("ViT-B/16 224² DP ÷ non-private (same call)", "≥ 0.88", lambda v: v >= 0.88,
           _own("vit_b16_224", lambda p: p[0]["dp_over_non_dp"])),
    Target("dpjax DP ÷ Opacus's best DP (ViT-B/16, same call)", "≥ 3", lambda v: v >= 3,
           _against("peers.opacus_vit",
                    lambda ours, theirs: ours[0]["examples_per_s"] / theirs[0]["examples_per_s"]),
           unit="×", history=True),
    Target("dpjax DP ÷ jax_privacy clipped_grad DP (same model, same call)", "≥ 1.5",
           lambda v: v >= 1.5,
           _against("peers.jax_privacy_vit",
                    lambda ours, theirs: ours[0]["examples_per_s"] / theirs[0]["examples_per_s"]),
           unit="×", history=True),
    Target("dpjax non-private ÷ timm's non-private (same call)", "≥ 1", lambda v: v >= 1,
           _against("peers.opacus_vit",
                    lambda ours, theirs: ours[1]["examples_per_s"] / theirs[1]["examples_per_s"]),
           unit="×", history=True),
    Target("ViT-B/16 384² DP ÷ non-private", "≥ 0.85", lambda v: v >= 0.85,
           _own("vit_b16_384", lambda p: p[0]["dp_over_non_dp"])),
    Target("ViT-L/16 224² DP ÷ non-private", "≥ 0.85", lambda v: v >= 0.85,
           _own("vit_l16_224", lambda p: p[0]["dp_over_non_dp"])),
    Target("ViT-B/16 224² DP step compile s", "≤ 30", lambda v: v <= 30,
           _own("vit_b16_224", lambda p: p[0]["compile_s"]), unit=" s"),
)


def _value(value: float, unit: str) -> str:
  if unit == "×":
    return f"{value:.2f}×"
  number = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
  return number + unit


def markdown(current: Sequence[Pair], history: Sequence[Pair]) -> list[str]:
  """The targets table's lines: target, what is needed, what the rows measure (`current`, or
  every plain run in `history` for a same-call ratio), whether it is met, and the rows'
  benchmarks, commits and dates."""
  lines = [f"**The performance targets (issue 28; {DEVICE}, bf16, AdamW, flat clipping) against "
           "the current rows below**", "",
           "| target | needed | measured | met | from (benchmark, commit, date) |",
           "|---|---|---|---|---|"]
  for target in TARGETS:
    found = target.measure(history if target.history else current)
    if found is None or found[0] is None:
      lines.append(f"| {target.name} | {target.needed} | not measured | — | — |")
      continue
    value, rows = found
    sources = "; ".join(f"{r['benchmark']} {r['commit'] or '—'} {(r['date'] or '—')[:10]}"
                        for r in rows if r["mode"] == "dp")
    lines.append(f"| {target.name} | {target.needed} | {_value(value, target.unit)} | "
                 f"{'yes' if target.met(value) else 'no'} | {sources} |")
  return lines
