"""The privacy plan: the mechanism a config implies, built once, immutable, public facts only.

A `PrivacyPlan` holds what the guarantee depends on: the sampling (its description emits the
steps' DpEvent, `sampling.PoissonSampling`), the noise multiplier (calibrated to the target ε
when unset), the clip rule's sensitivity, the accountant, the source a fine-tuning run composes,
and the phases of the run (public, mixed and private steps, SPARTA's selection). The ledger
records each private step with the plan's sampling and σ_eff (`record_private`), and the privacy
statement reads the plan, so the sampler, the accounting and the statement cannot disagree.

An automatic switch (`mixing.AutoSwitch`) decides the private phase during training: the plan made
before it has no private step; the switch makes a new plan value (`switched`), with σ calibrated
for the steps left and the step and reason of the decision, which the run records beside its
ledger (`plans` in the checkpoint record and results).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from dpjax import mixing
from dpjax.privacy import accounting, calibration, sampling
from dpjax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Phase:
  """Steps [start, stop) of one kind: "public" (α = 1, no private data read), "mixed"
  (0 < α < 1), "private" (α = 0), "selection" (SPARTA: private steps that only score rows),
  "undecided" (public until an automatic switch decides)."""
  kind: str
  start: int
  stop: int


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """The privacy mechanism of a run, fixed before the steps it covers (public facts only).

  noise_multiplier is None only when the plan has no private step. source: the run whose
  params this one starts from (`state.read_source`), None without finetune.init_from.
  clip_fraction_noise: σ_c of the clip count each private step releases (0: not released);
  effective_noise_multiplier: σ_eff, what the ledger and the budget guard account per private
  step (σ itself when σ_c = 0; `calibration.effective_noise_multiplier`).
  phases: the run's steps by kind, in order. decided_at / reason: the step at which an automatic
  switch made this plan, and why (None / "" for a plan made before training).
  """
  num_private_examples: int
  expected_batch_size: float
  sampling_rate: float
  planned_private_steps: int
  noise_multiplier: float | None
  delta: float
  accountant: str
  target_epsilon: float | None
  clip: str
  clip_norm: float
  sensitivity: float
  source: state_lib.Source | None = None
  clip_fraction_noise: float = 0.0
  effective_noise_multiplier: float | None = None
  phases: tuple[Phase, ...] = ()
  decided_at: int | None = None
  reason: str = ""

  def __post_init__(self):
    if self.effective_noise_multiplier is None and self.noise_multiplier is not None:
      object.__setattr__(self, "effective_noise_multiplier", calibration.effective_noise_multiplier(
          self.noise_multiplier, self.clip_fraction_noise))

  @property
  def sampling(self) -> sampling.PoissonSampling | None:
    """The private batches' sampling (None without private data): its event is the steps'."""
    return sampling.PoissonSampling(self.sampling_rate) if self.num_private_examples else None

  def record_private(self, ledger: accounting.PrivacyLedger) -> None:
    """Records one private step of this plan: the sampling's event at σ_eff."""
    if self.effective_noise_multiplier is None:
      raise AssertionError("a private step under a plan without a noise multiplier")
    ledger.record_private(self.sampling_rate, self.effective_noise_multiplier,
                          sampling=self.sampling.name)

  def phase_at(self, step: int) -> str:
    for phase in self.phases:
      if phase.start <= step < phase.stop:
        return phase.kind
    raise ValueError(f"Step {step} is outside the plan's phases {self.phases}.")

  def summary(self) -> dict[str, Any]:
    """What the checkpoint record and the results keep of the plan (JSON-able)."""
    return dataclasses.asdict(self)


PRIVATE_PHASES = ("mixed", "private", "selection")  # the phase kinds whose steps read private data


def phases_of(schedule: mixing.AlphaSchedule, total_steps: int,
              selection: tuple[int, int] | None = None) -> tuple[Phase, ...]:
  """The run's phases from its α schedule (an undecided automatic switch: "undecided" until its
  latest possible step), with SPARTA's selection steps [start, stop) marked."""
  if isinstance(schedule, mixing.AutoSwitch) and schedule.switch_step is None:
    return (Phase("undecided", 0, total_steps),)
  kinds = []
  for step in range(total_steps):
    alpha = schedule(step)
    kind = ("public" if not mixing.reads_private(alpha) else
            "private" if not mixing.reads_public(alpha) else "mixed")
    if selection is not None and selection[0] <= step < selection[1]:
      kind = "selection"
    kinds.append(kind)
  phases = []
  for step, kind in enumerate(kinds):
    if phases and phases[-1].kind == kind:
      phases[-1] = Phase(kind, phases[-1].start, step + 1)
    else:
      phases.append(Phase(kind, step, step + 1))
  return tuple(phases)


def plan_privacy(config: ml_collections.ConfigDict, num_private: int,
                 schedule: mixing.AlphaSchedule, sensitivity: float,
                 source: state_lib.Source | None = None) -> PrivacyPlan:
  """Sampling rate, private step count and noise multiplier (calibrated to the target ε if unset;
  with a source, so that the composition of the source's ledger and this run hits the target;
  with dp.clip_fraction_noise, σ_eff is calibrated and σ follows, `calibration.plan_noise`).

  Uses public facts only: the config, the schedule, the number of private examples, the source's
  ledger.
  """
  dp, total = config.dp, config.schedule.total_steps
  sparse = config.finetune.sparse
  selection = ((sparse.warmup_steps, sparse.warmup_steps + sparse.selection_steps)
               if sparse.method == "sparta" else None)
  phases = phases_of(schedule, total, selection)
  private_steps = mixing.count_private_steps(schedule, total)
  if num_private == 0:
    if private_steps:
      raise ValueError(f"The α schedule has {private_steps} private steps (α < 1) but there is no "
                       "private data (data.public_fraction = 1?).")
    return PrivacyPlan(0, 0.0, 0.0, 0, None, dp.delta, dp.accountant, dp.target_epsilon, dp.clip,
                       dp.clip_norm, sensitivity, source, phases=phases)
  q = dp.expected_batch_size / num_private
  if not 0 < q <= 1:
    raise ValueError(f"dp.expected_batch_size = {dp.expected_batch_size} must be in (0, "
                     f"{num_private}], the number of private examples.")
  accounting.check_delta(dp.delta, num_private)
  count_noise = float(dp.get("clip_fraction_noise", 0.0))
  prior = source.ledger if source else None
  sigma = effective = None
  if private_steps:
    sigma, effective = calibration.plan_noise(dp.noise_multiplier, count_noise, dp.target_epsilon,
                                             dp.delta, q, private_steps, dp.accountant, prior)
  elif count_noise and dp.noise_multiplier is None and isinstance(schedule, mixing.AutoSwitch):
    # Refuse now a σ_c that the earliest switch (the most private steps) would refuse.
    most = total - max(config.mixing.auto.min_switch_step, 0)
    if most > 0:
      calibration.plan_noise(None, count_noise, dp.target_epsilon, dp.delta, q, most,
                            dp.accountant, prior)
  return PrivacyPlan(num_private, float(dp.expected_batch_size), q, private_steps, sigma,
                     dp.delta, dp.accountant, dp.target_epsilon, dp.clip, dp.clip_norm,
                     sensitivity, source, count_noise, effective, phases)


def switched(plan: PrivacyPlan, config: ml_collections.ConfigDict,
             schedule: mixing.AutoSwitch) -> PrivacyPlan:
  """The new plan once the automatic switch has decided (schedule.switch_step set): private from
  that step on, σ calibrated for the steps left; `plan` itself is unchanged."""
  if schedule.switch_step is None:
    raise ValueError("The automatic switch has not decided yet: there is no new plan to make.")
  new = plan_privacy(config, plan.num_private_examples, schedule, plan.sensitivity, plan.source)
  return dataclasses.replace(new, decided_at=schedule.switch_step, reason=schedule.reason)
