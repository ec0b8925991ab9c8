"""The `mixing` block: the α schedule of g = α·g_pub + (1 − α)·g_priv (`dpjax.mixing`).

Users write it flat (`config.mixing = dict(schedule="switch", switch_step=200)`, the automatic
switch's settings under `mixing.auto`); `MixingSpec.from_mapping` parses it into the chosen
schedule's own spec (`SwitchSchedule(switch_step=200)`), looked up by name in `SCHEDULES`. A key
that only other schedules read but that differs from its default is refused: it would be
silently ignored. The flat layout is what checkpoints record (`trajectory_view`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from dpjax import mixing
from dpjax.config.fields import Registry, Spec, check, check_positive_int, field, refuse_unread


@dataclasses.dataclass(frozen=True)
class AlphaScheduleSpec(Spec):
  """One α schedule's settings. NAME: its mixing.schedule name."""
  BLOCK: ClassVar[str] = "mixing"
  NAME: ClassVar[str] = ""

  def build(self, public_batch_size: int, private_batch_size: float) -> mixing.AlphaSchedule:
    """The schedule (step -> α); the batch sizes are read by sample_ratio only."""
    del public_batch_size, private_batch_size
    return mixing.make_schedule(self.NAME, **dataclasses.asdict(self))

  def check(self):
    try:  # dpjax.mixing's own checks: α in [0, 1], until > begin, ...
      self.build(1, 1)
    except ValueError as e:
      raise type(e)(f"mixing.schedule = {self.NAME!r}: {e}") from e


def _start():
  return field(1.0, "linear, cosine: α at the start")


def _end():
  return field(0.0, "linear, cosine: α at the end")


def _until():
  return field(1, "linear, cosine: the step at which α reaches `end`")


@dataclasses.dataclass(frozen=True)
class SwitchSchedule(AlphaScheduleSpec):
  """α = 1 before switch_step (public pre-training), 0 from it on (DP continual pre-training)."""
  NAME: ClassVar[str] = "switch"
  switch_step: int = field(0, "switch: the first private step (α = 1 before it, 0 from it on)")


@dataclasses.dataclass(frozen=True)
class ConstantSchedule(AlphaScheduleSpec):
  """The same α at every step."""
  NAME: ClassVar[str] = "constant"
  alpha: float = field(0.0, "constant: α at every step (1: public only, 0: private only)")


@dataclasses.dataclass(frozen=True)
class LinearSchedule(AlphaScheduleSpec):
  """α from `start` at step `begin` to `end` at step `until`, linearly."""
  NAME: ClassVar[str] = "linear"
  start: float = _start()
  end: float = _end()
  begin: int = field(0, "linear: the step at which α leaves `start`")
  until: int = _until()


@dataclasses.dataclass(frozen=True)
class CosineSchedule(AlphaScheduleSpec):
  """Cosine decay of α from `start` at step 0 to `end` at step `until`."""
  NAME: ClassVar[str] = "cosine"
  start: float = _start()
  end: float = _end()
  until: int = _until()


@dataclasses.dataclass(frozen=True)
class SampleRatioSchedule(AlphaScheduleSpec):
  """α = B_pub / (B_pub + B_priv) (schedule.public_batch_size, dp.expected_batch_size): every
  example weighs the same."""
  NAME: ClassVar[str] = "sample_ratio"

  def build(self, public_batch_size: int, private_batch_size: float) -> mixing.AlphaSchedule:
    return mixing.make_schedule(self.NAME, public_batch_size=public_batch_size,
                                private_batch_size=private_batch_size)


@dataclasses.dataclass(frozen=True)
class AutoSwitchSpec(AlphaScheduleSpec):
  """Public until a controller fed with public statistics only switches, then private
  (`dpjax.mixing.AutoSwitch`)."""
  BLOCK: ClassVar[str] = "mixing.auto"
  NAME: ClassVar[str] = "auto"
  criterion: str = field("plateau", "switch when the held-out public plateau_metric stops "
                                    "improving (plateau, the default: the closest to the best "
                                    "fixed switch on cifar10_jpeg, experiments/results/"
                                    "bu2024_cifar), when the predicted DP improvement per step "
                                    "reaches the public one (improvement), on the first of the "
                                    "two (either), or when a "
                                   "DP step's predicted efficiency reaches the public steps' "
                                   "generalisation (efficiency; needs holdout_fraction > 0), or "
                                   "when lookahead_steps simulated DP steps on unseen public "
                                   "data lower the held-out loss at least as much as public steps "
                                   "do (lookahead; needs holdout_fraction > 0)")
  check_every: int = field(25, "steps between the controller's checks")
  patience: int = field(3, "plateau: checks without improvement before switching")
  min_delta: float = field(0.0, "plateau: the smallest decrease of the held-out loss that counts")
  min_rel_delta: float = field(0.0, "plateau: the smallest decrease that counts, as a share of "
                                    "the best held-out loss so far (the larger of the two counts)")
  plateau_metric: str = field("accuracy", "plateau: what it watches on the held-out public "
                                          "part: 'accuracy' (its error, 1 - accuracy), or 'loss'")
  holdout_fraction: float = field(0.1, "part of the public data held out for the plateau loss")
  min_switch_step: int = field(0, "no check before this step")
  max_switch_step: int = field(-1, "switch at this step at the latest (-1: no limit)")
  lookahead_steps: int = field(10, "lookahead: simulated DP steps per check (batches of "
                                   "curvature.batch_size)")
  generalisation_checks: int = field(1, "efficiency: the public generalisation is measured over "
                                        "this many checks back (1: since the last check)")

  def build(self, public_batch_size: int, private_batch_size: float) -> mixing.AutoSwitch:
    del public_batch_size, private_batch_size
    return mixing.AutoSwitch(criterion=self.criterion, patience=self.patience,
                             min_delta=self.min_delta, min_rel_delta=self.min_rel_delta,
                             plateau_metric=self.plateau_metric,
                             max_switch_step=self.max_switch_step if self.max_switch_step >= 0
                             else None, lookahead_steps=self.lookahead_steps,
                             generalisation_checks=self.generalisation_checks)

  def check(self):
    check(self.check_every > 0, "mixing.auto.check_every must be > 0.")
    check_positive_int("mixing.auto.patience", self.patience)
    check(0 <= self.holdout_fraction < 1,
          f"mixing.auto.holdout_fraction must be in [0, 1), got {self.holdout_fraction}.")
    check(self.criterion != "efficiency" or self.holdout_fraction > 0,
          "mixing.auto.criterion = 'efficiency' compares held-out and training public losses: "
          "set mixing.auto.holdout_fraction > 0.")
    check(self.criterion != "lookahead" or self.holdout_fraction > 0,
          "mixing.auto.criterion = 'lookahead' trains and measures on held-out public data: "
          "set mixing.auto.holdout_fraction > 0.")
    check(self.plateau_metric in mixing.AutoSwitch.PLATEAU_METRICS,
          f"mixing.auto.plateau_metric must be one of "
          f"{', '.join(mixing.AutoSwitch.PLATEAU_METRICS)}, got {self.plateau_metric!r}.")
    check_positive_int("mixing.auto.lookahead_steps", self.lookahead_steps)
    check_positive_int("mixing.auto.generalisation_checks", self.generalisation_checks)
    check(0 <= self.min_rel_delta < 1,
          f"mixing.auto.min_rel_delta must be in [0, 1), got {self.min_rel_delta}.")
    check(self.max_switch_step >= -1,
          f"mixing.auto.max_switch_step must be >= 0, or -1 for no limit; got "
          f"{self.max_switch_step}.")
    super().check()


SCHEDULES: Registry[type[AlphaScheduleSpec]] = Registry("mixing.schedule", {
    s.NAME: s for s in (SwitchSchedule, ConstantSchedule, LinearSchedule, CosineSchedule,
                        SampleRatioSchedule, AutoSwitchSpec)})


def _flat_keys() -> dict[str, tuple[Any, str, tuple[str, ...]]]:
  """key -> (default, meaning, the schedules that read it) for the flat keys of the block."""
  keys: dict[str, tuple[Any, str, tuple[str, ...]]] = {}
  for name, spec in SCHEDULES.entries.items():
    if spec is AutoSwitchSpec:
      continue
    for f in dataclasses.fields(spec):
      default, meaning, readers = keys.get(f.name, (f.default, f.metadata["help"], ()))
      if default != f.default:
        raise TypeError(f"The α schedules disagree on mixing.{f.name}'s default.")
      keys[f.name] = (default, meaning, readers + (name,))
  return keys


FLAT_KEYS = _flat_keys()
_RESET_MOMENTS = ("first", "moments", "all", "none")


@dataclasses.dataclass(frozen=True)
class MixingSpec(Spec):
  """schedule: the chosen schedule's spec; reset_moments: which optimizer moments are zeroed at
  the public→private switch (`dpjax.train.step.reset_moments`)."""
  BLOCK: ClassVar[str] = "mixing"
  schedule: AlphaScheduleSpec = field(SwitchSchedule(), "the α schedule")
  reset_moments: str = field("first", "optimizer state zeroed at the public→private switch: "
                                      "first (first moments), moments (Adam's m, v and its "
                                      "count), all (also the learning-rate schedule's count: "
                                      "the schedule and its warm-up restart), none", _RESET_MOMENTS)

  @property
  def name(self) -> str:
    return self.schedule.NAME

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> MixingSpec:
    check(isinstance(values, Mapping), f"mixing must be a block of keys (a dict), got {values!r}.")
    values = dict(values)
    name = values.pop("schedule", SwitchSchedule.NAME)
    check(isinstance(name, str), f"mixing.schedule must be a string, got {name!r}.")
    chosen = SCHEDULES.lookup(name)
    known = ["schedule", *FLAT_KEYS, "reset_moments", "auto"]
    unknown = sorted(set(values) - set(known))
    check(not unknown, f"Unknown config key mixing.{unknown[0] if unknown else ''}; mixing has "
                       f"{', '.join(known)}.")
    auto = AutoSwitchSpec.from_mapping(values.pop("auto", {}))
    flat = {k: values.pop(k) for k in list(values) if k in FLAT_KEYS}
    unread = dict(flat, **{f"auto.{k}": v for k, v in auto.changed().items()})
    defaults = {k: d for k, (d, _, _) in FLAT_KEYS.items()}
    defaults.update({f"auto.{f.name}": f.default for f in dataclasses.fields(AutoSwitchSpec)})
    readers = {k: r for k, (_, _, r) in FLAT_KEYS.items()}
    readers.update({k: ("auto",) for k in unread if k.startswith("auto.")})
    refuse_unread("mixing.schedule", name, unread, defaults, readers)
    own = {f.name for f in dataclasses.fields(chosen)}
    schedule = (auto if chosen is AutoSwitchSpec
                else chosen.from_mapping({k: v for k, v in flat.items() if k in own}))
    return cls(schedule=schedule, **values)

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    return {"schedule": SwitchSchedule.NAME, **{k: d for k, (d, _, _) in FLAT_KEYS.items()},
            "reset_moments": "first", "auto": AutoSwitchSpec.defaults()}

  @classmethod
  def describe(cls) -> list[tuple[str, Any, str]]:
    rows = [("mixing.schedule", SwitchSchedule.NAME,
             f"the α schedule (α: the public gradient's weight in g = α·g_pub + (1 − α)·g_priv); "
             f"one of {', '.join(SCHEDULES.names())}; the keys below say which schedule reads "
             f"them (dpjax/mixing.py)")]
    rows += [(f"mixing.{k}", d, meaning) for k, (d, meaning, _) in FLAT_KEYS.items()]
    rows.append(("mixing.reset_moments", "first",
                 f"optimizer moments zeroed at the public→private switch; one of "
                 f"{', '.join(_RESET_MOMENTS)}"))
    return rows + AutoSwitchSpec.describe()
