"""The experiment config: ml_collections blocks that experiments override, parsed once into frozen,
typed specs (`parse`) that check themselves.

Every key, its type, default and meaning is defined once, in the specs:
  blocks.py             data, model, dp, curvature, perf, mesh, distributed, finetune (+ sparse),
                        optimizer, schedule, eval, checkpoint, audit
  mixing_block.py       mixing: the α schedule, written flat, parsed into the chosen schedule's
                        spec (registered by name)
  contrastive_block.py  contrastive (+ augment, probe): contrastive pre-training
  run.py                RunSpec: all blocks, seed, log_every_steps and the checks across blocks
  registries.py         names → what they build: optimizers, lr schedules, sparse masks
  fields.py             the Spec base (types, choices, unknown keys), Registry
`default_config()` is generated from them; `python -m dpjax.main --help` (or
`python -m dpjax.config`) lists every key with its default and meaning (`help_text`).
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import ml_collections

from dpjax.config.contrastive_block import ContrastiveSpec
from dpjax.config.fields import ConfigError, Registry
from dpjax.config.run import RunSpec, parse, parse_block

__all__ = ["ConfigError", "ContrastiveSpec", "Registry", "RunSpec", "TRAJECTORY_BLOCKS",
           "agreement_view", "default_config", "default_contrastive_block", "help_text", "parse",
           "parse_block", "trajectory_view", "validate"]

# The blocks that decide the training trajectory; a checkpoint must agree with the config on them.
TRAJECTORY_BLOCKS = ("seed", "data", "model", "dp", "mixing", "finetune", "optimizer",
                     "schedule")


def default_config() -> ml_collections.ConfigDict:
  """A complete config with every field (the specs' defaults); experiments change what they need."""
  return ml_collections.ConfigDict(RunSpec.defaults())


def default_contrastive_block() -> ml_collections.ConfigDict:
  """The `contrastive` block's defaults (experiments/contrastive.py sets the block)."""
  return ml_collections.ConfigDict(ContrastiveSpec.defaults())


def validate(config: ml_collections.ConfigDict) -> RunSpec:
  """`parse(config)`: raises ValueError (ConfigError) with a clear message for configs that cannot
  run correctly; returns the RunSpec."""
  return parse(config)


def help_text() -> str:
  """Every config key, grouped by block, with its default and meaning."""
  groups: dict[str, list[str]] = {}
  for key, default, meaning in RunSpec.describe():
    lines = groups.setdefault(key.split(".")[0] if "." in key else "top level", [])
    lines.append(f"  {key} = {default!r}")
    lines += textwrap.wrap(meaning, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
  intro = ("Config keys, with their defaults and meanings. Set one with --config.KEY=VALUE; "
           "experiments/*.py set whole blocks; a config with a `contrastive` block runs "
           "contrastive pre-training (dpjax/train/contrastive_loop.py).")
  return "\n".join(textwrap.wrap(intro, 100) + [
      f"\n{block}:\n" + "\n".join(lines) for block, lines in groups.items()])


def agreement_view(config: ml_collections.ConfigDict) -> dict:
  """What every process of a multi-process run must agree on: all but the `distributed` block."""
  return {k: v for k, v in config.to_dict().items() if k != "distributed"}


PIPELINE_KEYS = ("workers", "threads", "prefetch", "in_memory")  # data: how batches are read


def trajectory_view(config: ml_collections.ConfigDict) -> dict:
  """The part of the config that must match for a checkpoint to be resumed (the `audit` block
  only when it inserts canaries, never data.workers/threads/prefetch (how batches are read, not
  which), finetune.init_from_public only when True, dp.clip_fraction_noise only when it is set,
  data.classes, data.image_shape and data.manual_dir only when given, data.augment and dp.augmult
  only when not 'none' and 1, so runs without them match checkpoints from before them; keys
  added since need no such rule: see `trajectory_differences`)."""
  full = config.to_dict()
  view = {k: full[k] for k in TRAJECTORY_BLOCKS}
  view["data"] = {k: v for k, v in view["data"].items()  # how batches are read: not what
                  if (v or k not in ("classes", "image_shape", "manual_dir"))
                  and k not in PIPELINE_KEYS}
  for block, key, unset in (("dp", "clip_fraction_noise", 0), ("dp", "augmult", 1),
                            ("data", "augment", "none")):
    if view[block].get(key) == unset:
      view[block] = {k: v for k, v in view[block].items() if k != key}
  if full.get("audit", {}).get("canaries"):
    view["audit"] = full["audit"]
  if not view["finetune"].get("init_from_public", True):  # matches checkpoints from before it
    view["finetune"] = {k: v for k, v in view["finetune"].items() if k != "init_from_public"}
  return view


_ABSENT = object()


def trajectory_differences(saved: dict, current: dict) -> list[str]:
  """'block.key: checkpoint X vs now Y' for each key where a checkpoint's trajectory record
  (`saved`) and the current run's `trajectory_view` differ; [] when the run may resume it.

  A key the record lacks matches when the current value is dpjax's default: a config key added
  after the checkpoint was written must default to the behaviour from before it (the rule every
  new key keeps). Both sides are compared as JSON values (tuples as lists)."""
  defaults = json.loads(json.dumps(trajectory_view(default_config())))
  return _differences(saved, json.loads(json.dumps(current)), defaults, "")


def _differences(saved: dict, current: dict, defaults: Any, path: str) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    was, now = saved.get(key, _ABSENT), current.get(key, _ABSENT)
    default = defaults.get(key, _ABSENT) if isinstance(defaults, dict) else _ABSENT
    if was is _ABSENT and now is not _ABSENT and now == default:
      continue
    if isinstance(was, dict) and isinstance(now, dict):
      out += _differences(was, now, default, f"{path}{key}.")
    elif was != now:
      show = lambda v: "absent" if v is _ABSENT else repr(v)
      out.append(f"{path}{key}: checkpoint {show(was)} vs now {show(now)}")
  return out
