"""Canaries for privacy audits: which examples, their labels, and which ones a run trains on.

A canary set is a public function of (dataset, config.audit): `count` examples, either training
images given a wrong label ("mislabel": taken out of the training split, so they are in no other
part of the data) or uniform-noise images with random labels ("noise"). Each canary is inserted
into the trained part independently with probability 1/2 — the coin flips of Steinke, Nasr &
Jagielski's one-run audit, drawn from `audit.inclusion_seed` alone. Inserted canaries are appended
after the part's own examples, so its first rows are unchanged.

Privacy: canaries are ordinary examples of the part they join. Inserted into the private set,
each is protected like any other private example (add/remove adjacency), which is exactly what an
audit tests; the accountant counts them in the private set's size.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from dpjax.data import lazy_images
from dpjax.data.dataset import Dataset

KINDS = ("mislabel", "noise")
PARTS = ("private", "public")
_CANARY_STREAM = 0xCA7A     # keeps these generators apart from others seeded with the same seed
_INCLUSION_STREAM = 0x1C1


@dataclasses.dataclass(frozen=True)
class Canaries:
  """m canaries and the coin flips of one run.

  Attributes:
    images: uint8 [m, H, W, C].
    labels: int32 [m], the labels they are trained (and scored) with.
    source_indices: int64 [m], their rows in the training split ("mislabel"), or −1 ("noise").
    included: bool [m], which ones the run trained on.
    kind: "mislabel" or "noise".
    part: "private" or "public", the part the included ones joined.
  """
  images: np.ndarray
  labels: np.ndarray
  source_indices: np.ndarray
  included: np.ndarray
  kind: str
  part: str

  def __len__(self) -> int:
    return len(self.labels)

  def inserted(self, like: Dataset) -> Dataset:
    """The included canaries as a Dataset with `like`'s classes and name."""
    keep = np.flatnonzero(self.included)
    return dataclasses.replace(like, images=self.images[keep], labels=self.labels[keep],
                               split=f"{like.split}[canaries]")


def validate(audit: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an `audit` config block that cannot build canaries
  (`dpjax.config.blocks.AuditSpec`'s checks)."""
  from dpjax.config import blocks  # here: dpjax.config imports this module for KINDS and PARTS
  blocks.AuditSpec.from_mapping(audit.to_dict())


def take_canaries(train: Dataset, audit: ml_collections.ConfigDict
                  ) -> tuple[Dataset, Canaries | None]:
  """(training split without the canaries' source examples, canaries) for `audit` (a config's
  `audit` block: canaries, kind, seed, inclusion_seed, insert_into); (train, None) without any.

  The canaries depend on (len(train), its labels' classes, audit.seed) only; the coin flips on
  audit.inclusion_seed only, so runs that differ in inclusion_seed audit the same canaries.
  """
  validate(audit)
  m = int(audit.canaries)
  if not m:
    return train, None
  if m > len(train) // 2:
    raise ValueError(f"audit.canaries = {m} is more than half of the {len(train)} training "
                     "examples; use fewer canaries.")
  rng = np.random.default_rng([audit.seed, _CANARY_STREAM])
  k = train.num_classes
  if audit.kind == "mislabel":
    source = np.sort(rng.choice(len(train), m, replace=False))
    images = train.images[source]
    labels = (train.labels[source] + rng.integers(1, k, m)) % k  # never the true label
    rest = np.setdiff1d(np.arange(len(train)), source)
    train = train.subset(rest, "without canaries")
  else:
    source = np.full(m, -1, np.int64)
    images = rng.integers(0, 256, (m,) + train.image_shape, dtype=np.uint8)
    labels = rng.integers(0, k, m)
  included = np.random.default_rng([audit.inclusion_seed, _INCLUSION_STREAM]).random(m) < 0.5
  return train, Canaries(images, labels.astype(np.int32), source.astype(np.int64), included,
                         audit.kind, audit.insert_into)


def insert(part: Dataset, canaries: Canaries | None) -> Dataset:
  """`part` with the included canaries appended (unchanged without canaries)."""
  if canaries is None:
    return part
  added = canaries.inserted(part)
  images = (part.images.append(added.images) if isinstance(part.images, lazy_images.LazyImages)
            else np.concatenate([part.images, added.images]))  # lazy images stay lazy
  return dataclasses.replace(part, images=images,
                             labels=np.concatenate([part.labels, added.labels]))
