"""Public / private splits of the training data.

The split depends only on (num_examples, public_fraction, seed), never on the data, so which
examples are public is itself public information. Public and private parts never share an
example: that is what lets public-only steps cost no privacy budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpjax.data.dataset import Dataset

_SPLIT_STREAM = 0x5B117  # keeps this generator apart from others seeded with the same seed


class OverlapError(ValueError):
  """Public and private data share examples."""


@dataclasses.dataclass(frozen=True)
class PublicPrivate:
  """The public and the private training data (disjoint)."""
  public: Dataset
  private: Dataset


def public_private_split(num_examples: int, public_fraction: float,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits range(num_examples) at random into public and private indices.

  Args:
    num_examples: N, the size of the dataset being split.
    public_fraction: in [0, 1]; the public part has round(public_fraction * N) examples.
    seed: the split is a deterministic function of (N, public_fraction, seed).

  Returns:
    (public_idx, private_idx): sorted int64 arrays [n_pub] and [N - n_pub]; disjoint, and
    together they cover range(N).
  """
  if not 0.0 <= public_fraction <= 1.0:
    raise ValueError(f"public_fraction must be in [0, 1], got {public_fraction}.")
  permutation = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(num_examples)
  num_public = int(round(public_fraction * num_examples))
  return np.sort(permutation[:num_public]), np.sort(permutation[num_public:])


def check_disjoint(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("public", "private")
                   ) -> None:
  """Raises OverlapError if the index arrays `a` [n] and `b` [m] share an index."""
  overlap = np.intersect1d(a, b)
  if overlap.size:
    raise OverlapError(
        f"{names[0]} and {names[1]} indices overlap in {overlap.size} examples (first: "
        f"{overlap[:5].tolist()}). Private examples must never be used as {names[0]} data: "
        "build both from one public_private_split.")


def split_dataset(dataset: Dataset, public_fraction: float, seed: int) -> PublicPrivate:
  """Splits one dataset into disjoint public and private parts (see `public_private_split`)."""
  public_idx, private_idx = public_private_split(len(dataset), public_fraction, seed)
  check_disjoint(public_idx, private_idx)
  return PublicPrivate(public=dataset.subset(public_idx, "public"),
                       private=dataset.subset(private_idx, "private"))


def pair_datasets(public: Dataset, private: Dataset) -> PublicPrivate:
  """Uses one dataset as public and another as private data (same image shape and classes,
  since one model trains on both).

  Raises ValueError if the two are the same split of the same dataset or their images or label
  spaces differ. That two different datasets share no individual is the caller's claim.
  """
  if (public.name, public.split) == (private.name, private.split):
    raise OverlapError(f"public and private are both {public.name} {public.split!r}; use "
                       "split_dataset to divide one dataset.")
  if public.image_shape != private.image_shape or public.num_classes != private.num_classes:
    raise ValueError(f"public data ({public.name}: images {public.image_shape}, "
                     f"{public.num_classes} classes) does not match private data "
                     f"({private.name}: images {private.image_shape}, "
                     f"{private.num_classes} classes).")
  return PublicPrivate(public=public, private=private)
