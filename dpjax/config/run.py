"""`RunSpec`: a whole config parsed once into frozen, typed block specs, with the checks that span
blocks. Each block checks itself on construction (`blocks`, `mixing_block`, `contrastive_block`);
checks that need the data (q ≤ 1, δ < 1/N, train_examples ≤ the split) stay where it is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import ml_collections

from dpjax.config import blocks
from dpjax.config.contrastive_block import ContrastiveSpec
from dpjax.config.fields import INTERVAL, Spec, check, check_positive_int, field
from dpjax.config.mixing_block import MixingSpec, SwitchSchedule


@dataclasses.dataclass(frozen=True)
class RunSpec(Spec):
  """A run's config. `contrastive` is set for contrastive pre-training (its own trainer), None for
  supervised training."""
  BLOCK: ClassVar[str] = ""
  seed: int = field(0, "seeds public randomness only (init, splits, public batches); never the "
                       "mechanism's noise or private batches")
  data: blocks.DataSpec = field(blocks.DataSpec(), "data")
  model: blocks.ModelSpec = field(blocks.ModelSpec(), "model")
  dp: blocks.DPSpec = field(blocks.DPSpec(), "dp")
  mixing: MixingSpec = field(MixingSpec(), "mixing")
  curvature: blocks.CurvatureSpec = field(blocks.CurvatureSpec(), "curvature")
  perf: blocks.PerfSpec = field(blocks.PerfSpec(), "perf")
  mesh: blocks.MeshSpec = field(blocks.MeshSpec(), "mesh")
  distributed: blocks.DistributedSpec = field(blocks.DistributedSpec(), "distributed")
  finetune: blocks.FinetuneSpec = field(blocks.FinetuneSpec(), "finetune")
  optimizer: blocks.OptimizerSpec = field(blocks.OptimizerSpec(), "optimizer")
  schedule: blocks.ScheduleSpec = field(blocks.ScheduleSpec(), "schedule")
  eval: blocks.EvalSpec = field(blocks.EvalSpec(), "eval")
  checkpoint: blocks.CheckpointSpec = field(blocks.CheckpointSpec(), "checkpoint")
  audit: blocks.AuditSpec = field(blocks.AuditSpec(), "audit")
  log_every_steps: int = field(10, "write training metrics every N steps")
  contrastive: ContrastiveSpec | None = field(None, "contrastive")

  def check(self):
    check_positive_int("log_every_steps", self.log_every_steps, INTERVAL)
    check(self.model.kwargs.get("attention") != "cudnn" or self.perf.dtype != "float32",
          "model.attention='cudnn' is cuDNN's flash attention, which takes bfloat16 or float16 "
          "only: set perf.dtype='bfloat16', or model.attention='fused'.")
    if self.contrastive is None:
      self._check_supervised()
    else:
      self._check_contrastive()

  def _check_supervised(self):
    dp, sparse, steps = self.dp, self.finetune.sparse, self.schedule.total_steps
    check(dp.noise_multiplier is not None or dp.target_epsilon is not None,
          "Set dp.noise_multiplier or dp.target_epsilon (or both: then training stops before the "
          "budget would be exceeded).")
    check(steps > 0, f"schedule.total_steps must be > 0, got {steps}.")
    check(dp.augmult == 1 or self.data.augment != "none",
          f"dp.augmult = {dp.augmult} views per example need an augmentation: set data.augment "
          "(e.g. 'crop_flip'); without one the views are copies of the image.")
    if sparse.method != "none":
      check(self.mixing.schedule == SwitchSchedule(switch_step=0),
            "Sparse fine-tuning runs private steps only: set mixing.schedule='switch' and "
            "mixing.switch_step=0 (pre-train on public data in a run of its own and start from it "
            "with finetune.init_from).")
    if sparse.method == "sparta":
      check(sparse.warmup_steps + sparse.selection_steps < steps,
            f"finetune.sparse: warmup_steps + selection_steps = "
            f"{sparse.warmup_steps + sparse.selection_steps} leaves no sparse fine-tuning step "
            f"within schedule.total_steps = {steps}.")

  def _check_contrastive(self):
    check(self.data.public_fraction == 0 and not self.data.public_name,
          "Contrastive pre-training treats every training image as private: set "
          "data.public_fraction=0 and leave data.public_name empty.")
    check(not self.audit.canaries,
          "audit.canaries are labelled examples for supervised training; the contrastive trainer "
          "does not insert them. Set audit.canaries=0.")
    check(self.data.augment == "none" and self.dp.augmult == 1,
          "data.augment and dp.augmult are for supervised training; the contrastive trainer "
          "takes two views of each image as contrastive.augment says. Leave them at 'none' "
          "and 1.")
    check(self.dp.clip == "flat",
          f"Contrastive methods clip pair (Logit-DP) or row (naive) gradients to dp.clip_norm: set "
          f"dp.clip='flat', not {self.dp.clip!r}.")
    if self.contrastive.private:
      check(self.dp.noise_multiplier is not None or self.dp.target_epsilon is not None,
            "Set dp.noise_multiplier or dp.target_epsilon for a DP method.")
    check(self.perf.microbatch_size > 0,
          f"perf.microbatch_size must be > 0 for the contrastive trainer (0, chosen from free "
          f"memory, is for the supervised trainer only); got {self.perf.microbatch_size}.")


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Mapping[str, Any]:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def parse(config: ml_collections.ConfigDict | Mapping[str, Any]) -> RunSpec:
  """The config as a RunSpec; ConfigError (a ValueError) for an unknown key (naming the block's
  keys), a value of the wrong type or a value that cannot run. Missing keys take defaults."""
  return RunSpec.from_mapping(_as_dict(config))


def parse_block(config: ml_collections.ConfigDict | Mapping[str, Any], name: str) -> Spec:
  """One block of the config as its spec (e.g. "mixing", "optimizer"), without the others."""
  spec = RunSpec.block_type(name)
  check(spec is not None, f"Unknown config block {name!r}; blocks: "
                          f"{', '.join(n for n in _BLOCKS if RunSpec.block_type(n))}.")
  return spec.from_mapping(_as_dict(config).get(name, {}))


_BLOCKS = tuple(f.name for f in dataclasses.fields(RunSpec))
