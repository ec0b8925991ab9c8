"""The privacy statement of a run: what was guaranteed, in the terms a reader needs to check it.

Every field comes from the run's plan (`dpjax.train.plan`: the sampling, its adjacency, σ, the
clip rule) and its ledger (what ran), never from constants of its own.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dpjax.privacy import accounting, noise, sampling
from dpjax.train import plan as plan_lib, state as state_lib


def randomness_statement(config: ml_collections.ConfigDict) -> str:
  """Where the mechanism's randomness (noise, Poisson batches) came from (never its value)."""
  if config.dp.get("insecure_reproducible_seed") is None:
    return ("secret: 128 bits of fresh OS entropy drawn at the run's start, kept only in its "
            "training checkpoints")
  return ("INSECURE reproducible mode (dp.insecure_reproducible_seed): the noise and the batches "
          "follow from that integer; the guarantee holds only while it stays secret, and runs "
          "sharing it share their noise")


def released_statement(plan: plan_lib.PrivacyPlan) -> str:
  """What each private step releases: everything the ledger accounts for."""
  if plan.noise_multiplier is None:
    return "nothing (no private step)"
  released = ("the clipped gradient sum + N(0, (σ·S)²·I), over the expected batch size (through "
              "the update, or SPARTA's selection scores)")
  if not plan.clip_fraction_noise:
    return released
  return (released + "; and, from the same Poisson sample, the number of examples whose gradient "
          "norm exceeds the clip norm + N(0, σ_c²), logged over the expected batch size as "
          "noisy_clip_fraction. Together one Gaussian mechanism of noise multiplier σ_eff = "
          "(σ⁻² + σ_c⁻²)^(-1/2), the one accounted")


def step_work_statement(sampler: sampling.PoissonSampler) -> str:
  """What a private step's work (and so its time) depends on, for the run's sampler."""
  if sampler.constant_work:
    k, m = sampler.min_microbatches, sampler.microbatch_size
    return (f"constant: every private step runs {k} microbatches of {m} rows and reads every "
            f"row, unless its Poisson batch exceeds {k * m} examples (dp.constant_time; "
            "timing_delta adds that chance to δ)")
  return ("ceil(|B|/m) microbatches of m = perf.microbatch_size rows and |B| rows read per "
          "private step: step times and train_seconds follow the private batch sizes |B|, which "
          "this guarantee does not cover (dp.constant_time=True pads every step to one capacity)")


def privacy_statement(plan: plan_lib.PrivacyPlan, ledger: accounting.PrivacyLedger,
                      config: ml_collections.ConfigDict | None = None,
                      noise_values_per_step: int = 0,
                      sampler: sampling.PoissonSampler | None = None) -> dict[str, Any]:
  """What was guaranteed, in the terms a reader needs to check it. With a source (the run this
  one started from), ε composes its ledger, and composed_from says what was composed. With the
  config, where the mechanism's randomness came from. With noise_values_per_step (the values the
  noise draws each private step, `noise.values_per_step`), noise_tail_delta: what the float
  sampler's missing tail adds to δ for this run's private steps (`noise.tail_delta`). With the
  run's batch sampler, step_work: what a private step's work and time depend on, and, for a
  constant-work sampler, timing_delta: what its capacity's overflow adds to δ
  (`sampling.timing_delta`)."""
  conversion = {"pld": "PLD (dp_accounting PLDAccountant, pessimistic discretisation)",
                "rdp": "RDP, dp_accounting's RDP-to-(ε, δ) conversion",
                "rdp_classic": "RDP, classic conversion min_α RDP(α) + log(1/δ)/(α−1)"}
  statement = dict(
      epsilon=ledger.epsilon(plan.delta, plan.accountant), delta=plan.delta,
      accountant=plan.accountant, conversion=conversion[plan.accountant],
      private_steps=ledger.private_steps, public_steps=ledger.public_steps,
      sampling_rate=plan.sampling_rate,
      sampling=plan.sampling.description if plan.sampling else None,
      expected_batch_size=plan.expected_batch_size, noise_multiplier=plan.noise_multiplier,
      clip_fraction_noise=plan.clip_fraction_noise,
      effective_noise_multiplier=plan.effective_noise_multiplier, released=released_statement(plan),
      clip=plan.clip, clip_norm=plan.clip_norm, sensitivity=plan.sensitivity,
      unit_of_privacy=("one training example (image and label) of the private set; "
                       f"{plan.sampling.adjacency if plan.sampling else 'add/remove'} adjacency"),
      num_private_examples=plan.num_private_examples,
      non_private=plan.num_private_examples == 0,
      randomness=None if config is None else randomness_statement(config),
      epsilon_by_accountant={a: ledger.epsilon(plan.delta, a) for a in accounting.ACCOUNTANTS})
  if noise_values_per_step and ledger.private_steps and plan.noise_multiplier > 0:
    drawn = noise_values_per_step + (1 if plan.clip_fraction_noise else 0)  # + the count's
    statement["noise_tail_delta"] = noise.tail_delta(drawn, ledger.private_steps,
                                                     statement["epsilon"])
  if sampler is not None and ledger.private_steps:
    statement["step_work"] = step_work_statement(sampler)
    if sampler.constant_work:
      statement["timing_delta"] = sampling.timing_delta(sampler, ledger.private_steps,
                                                        statement["epsilon"])
  if plan.source is not None:
    statement["composed_from"] = state_lib.composition_record(plan.source, ledger, plan.delta,
                                                              plan.accountant)
    statement["epsilon_this_run"] = ledger.alone().epsilon(plan.delta, plan.accountant)
  return statement


def format_statement(s: dict[str, Any]) -> str:
  if s["non_private"]:
    return ("Privacy: none. Every training example was used as public data (no private set), so "
            "this run gives no differential-privacy guarantee." + _format_source(s))
  sigma = "none" if s["noise_multiplier"] is None else f"{s['noise_multiplier']:.4f}"
  return (f"Privacy: ({s['epsilon']:.3f}, {s['delta']:g})-DP for {s['unit_of_privacy']}.\n"
          f"  accountant: {s['conversion']}; the same steps under every accountant: "
          + ", ".join(f"{k} {v:.3f}" for k, v in s["epsilon_by_accountant"].items()) + "\n"
          f"  {s['private_steps']} private steps ({s['sampling']} sampling, q = {s['sampling_rate']:.5f}, "
          f"expected batch {s['expected_batch_size']:g} of {s['num_private_examples']}), "
          f"{s['public_steps']} public-only steps (no privacy cost)\n"
          f"  noise multiplier {sigma}, clip rule {s['clip']} (norm {s['clip_norm']:g}, "
          f"sensitivity {s['sensitivity']:.4g})" + _format_source(s)
          + (f"\n  the float noise sampler's tail beyond 12.06σ adds {s['noise_tail_delta']:.2g} "
             f"to δ (noise.tail_delta)" if s.get("noise_tail_delta") else "")
          + (f"\n  step work: {s['step_work']}" if s.get("step_work") else "")
          + (f"\n  the capacity's overflow adds {s['timing_delta']:.2g} to δ "
             f"(sampling.timing_delta)" if s.get("timing_delta") is not None else "")
          + (f"\n  clip count released with noise σ_c = {s['clip_fraction_noise']:g}; each "
             f"private step accounted as one Gaussian of σ_eff = "
             f"{s['effective_noise_multiplier']:.4f} (σ = {sigma} on the gradient)"
             if s.get("clip_fraction_noise") and s["noise_multiplier"] is not None else "")
          + (f"\n  released per private step: {s['released']}" if s.get("released") else "")
          + (f"\n  randomness: {s['randomness']}" if s.get("randomness") else ""))


def _format_source(s: dict[str, Any]) -> str:
  source = s.get("composed_from")
  if source is None:
    return ""
  if source["declared_public"]:
    return (f"\n  started from {source['workdir']}, whose training data was declared public "
            "(finetune.init_from_public): not composed")
  return (f"\n  composed at this run's δ with the {source['private_steps']} private steps of "
          f"{source['workdir']} (the run it started from, and its sources; ε = "
          f"{source['epsilon_alone']:.3f} alone); this run alone: ε = {s['epsilon_this_run']:.3f}")
