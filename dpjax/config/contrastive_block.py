"""The `contrastive` block: DP contrastive pre-training and its linear probes
(dpjax/train/contrastive_loop.py; experiments/contrastive.py sets it). A config with this block
runs the contrastive trainer; `run.RunSpec` checks it against the other blocks."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from dpjax.config.fields import Spec, check, check_at_least, check_positive_int, field
from dpjax.data import specs as data_specs

# logit_dp | naive | nonprivate | random_init (no training: probes of the initial encoder)
METHODS = ("logit_dp", "naive", "nonprivate", "random_init")
DP_METHODS = ("logit_dp", "naive")
PAIR_METHODS = ("jacobian", "ghost")  # dpjax.contrastive.PAIR_METHODS


@dataclasses.dataclass(frozen=True)
class AugmentSpec(Spec):
  """The two views of an image (dpjax.data.augment)."""
  BLOCK: ClassVar[str] = "contrastive.augment"
  crop_scale_min: float = field(0.3, "smallest area fraction of a random crop")
  flip: bool = field(True, "random horizontal flips")
  brightness: float = field(0.4, "largest brightness change")
  contrast: float = field(0.4, "largest contrast change")
  noise_std: float = field(0.0, "std of added Gaussian pixel noise")

  def check(self):
    check(0 < self.crop_scale_min <= 1,
          f"contrastive.augment.crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")
    for name in ("brightness", "contrast", "noise_std"):
      check_at_least(self.path(name), getattr(self, name), 0.0)


@dataclasses.dataclass(frozen=True)
class ProbeSpec(Spec):
  """Linear probes after training, one per dataset (never on a private example)."""
  BLOCK: ClassVar[str] = "contrastive.probe"
  datasets: str = field("fashion_mnist,mnist", "comma-separated datasets to probe on")
  train_examples: int = field(0, "cap on a probe's training examples (0: all)")
  test_examples: int = field(0, "cap on a probe's test examples (0: all)")
  steps: int = field(500, "probe training steps")
  l2: float = field(1e-4, "L2 penalty of the probe")
  learning_rate: float = field(0.05, "probe learning rate")

  def check(self):
    for name in [n.strip() for n in self.datasets.split(",") if n.strip()]:
      check(name in data_specs.KNOWN_DATASETS,
            f"contrastive.probe.datasets: unknown dataset {name!r}; known: "
            f"{', '.join(data_specs.KNOWN_DATASETS)}.")
    for name in ("train_examples", "test_examples", "steps", "l2"):
      check_at_least(self.path(name), getattr(self, name), 0)
    check(self.learning_rate > 0,
          f"contrastive.probe.learning_rate must be > 0, got {self.learning_rate}.")


@dataclasses.dataclass(frozen=True)
class ContrastiveSpec(Spec):
  BLOCK: ClassVar[str] = "contrastive"
  method: str = field("logit_dp", "Logit-DP, naive per-row DP, no privacy, or no training "
                                  "(probes of the initial encoder)", METHODS)
  temperature: float = field(1.0, "τ of the InfoNCE loss")
  representation_dim: int = field(64, "outputs of model.name's network: the representation")
  hidden_dim: int = field(128, "the projection head's hidden width")
  embedding_dim: int = field(32, "the projection head's output width")
  max_batch_size: int = field(0, "naive only: the largest batch (a privacy parameter); 0: "
                                 "E[n] + 5·sqrt(E[n]) rounded up to whole microbatches")
  pair_method: str = field("jacobian", "how Logit-DP's pair gradients (and naive's rows) are "
                                      "formed: jacobian (embedding Jacobians, 2n·d·p floats) or "
                                      "ghost (layer by layer, dpjax.contrastive_ghost); never "
                                      "changes the privacy event", PAIR_METHODS)
  augment: AugmentSpec = field(AugmentSpec(), "augmentation")
  probe: ProbeSpec = field(ProbeSpec(), "linear probes")
  eval_batch_size: int = field(512, "test images of the contrastive-loss evaluation")

  @property
  def private(self) -> bool:
    return self.method in DP_METHODS

  def check(self):
    check(math.isfinite(self.temperature) and self.temperature > 0,
          f"contrastive.temperature must be > 0, got {self.temperature!r}.")
    for name in ("representation_dim", "hidden_dim", "embedding_dim", "eval_batch_size"):
      check_positive_int(self.path(name), getattr(self, name))
    check(self.max_batch_size >= 0,
          f"contrastive.max_batch_size must be >= 0, got {self.max_batch_size}.")
