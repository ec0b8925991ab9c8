"""Batches that are PUBLIC by construction, for computations that steer training without noise.

Curvature statistics (`dpjax.curvature`) and everything they decide (the automatic switch, α,
batch sizes) may read only public data. They accept only a `PublicBatch`, which only
`public_batch` builds, and it refuses a dataset part labelled private (`PrivateDataError`). The
check trusts the `Dataset.split` label (parts made by `split_dataset` are labelled); a dataset
mislabelled as public defeats it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.data.dataset import Dataset, to_float


class PrivateDataError(ValueError):
  """Private data was offered to a computation that may only read public data."""


_BUILT_BY_PUBLIC_BATCH = object()  # only `public_batch` passes this to PublicBatch


@dataclasses.dataclass(frozen=True, eq=False)
class PublicBatch:
  """A batch of PUBLIC examples. Build it with `public_batch`; the constructor refuses otherwise.

  Attributes:
    image: float32 [n, H, W, C], preprocessed.
    label: int32 [n].
    source: where it came from, e.g. "mnist train[public]".

  The token check stops accidents, not deliberate bypasses (dataclasses.replace, object.__setattr__).
  """
  image: jax.Array
  label: jax.Array
  source: str
  _token: object = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self._token is not _BUILT_BY_PUBLIC_BATCH:
      raise TypeError("PublicBatch is built only by public_batch(dataset, indices), "
                      "which checks that the dataset is not private.")

  def __len__(self) -> int:
    return int(self.label.shape[0])

  def as_dict(self) -> dict[str, jax.Array]:
    """{"image": [n, H, W, C], "label": [n]}, the batch format of the losses."""
    return {"image": self.image, "label": self.label}


def public_batch(dataset: Dataset, indices: np.ndarray,
                 preprocess: Callable[[np.ndarray], np.ndarray] = to_float) -> PublicBatch:
  """Examples `indices` [n] of a public `dataset`, images preprocessed to float32 [n, H, W, C].

  Raises PrivateDataError if `dataset.split` marks it private (contains "private", e.g.
  "train[private]" from `split_dataset`), and TypeError if `dataset` is not a `Dataset`.
  Privacy: the returned batch holds only examples of a dataset not labelled private.
  """
  if not isinstance(dataset, Dataset):
    raise TypeError(f"public_batch needs a dpjax.data.Dataset, got {type(dataset).__name__}.")
  if "private" in dataset.split.lower():
    raise PrivateDataError(
        f"{dataset.name} {dataset.split!r} is private data. Curvature statistics steer training "
        "(switch point, α, batch size) without noise, so they may only read public data: use the "
        "public part (split_dataset(...).public), or privatise the statistics yourself.")
  indices = np.asarray(indices)
  if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"indices must be a non-empty 1-D integer array, got {indices.dtype} "
                     f"{indices.shape}.")
  if indices.min() < 0 or indices.max() >= len(dataset):
    raise ValueError(f"indices must lie in [0, {len(dataset)}), got [{indices.min()}, "
                     f"{indices.max()}].")
  images = np.asarray(preprocess(dataset.images[indices]), np.float32)
  if images.shape != (len(indices),) + dataset.image_shape:
    raise ValueError(f"preprocess changed the image shape to {images.shape}; expected "
                     f"{(len(indices),) + dataset.image_shape}.")
  return PublicBatch(jnp.asarray(images), jnp.asarray(dataset.labels[indices], jnp.int32),
                     f"{dataset.name} {dataset.split}".strip(), _BUILT_BY_PUBLIC_BATCH)


def require_public(batch: Any, caller: str) -> dict[str, jax.Array]:
  if not isinstance(batch, PublicBatch):
    raise TypeError(
        f"{caller} reads only a PublicBatch (built by public_batch from a public "
        f"Dataset), got {type(batch).__name__}. Curvature statistics steer training, so they may "
        "only read public data.")
  return batch.as_dict()
