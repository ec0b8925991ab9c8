"""Public / private splits of the training data.

The split depends only on (num_examples, public_fraction, seed), never on the data, so which
examples are public is itself public information. Public and private parts never share an
example: that is what lets public-only steps cost no privacy budget.

`split_dataset(..., public_classes=...)` draws the public part from some classes only (Bu et
al.'s regime: the public data lacks most of the private task's classes). That split reads the
labels, so it simulates a public dataset published beforehand: the guarantee is for the private
part GIVEN the public one (the usual public-data assumption, as with `pair_datasets`), not for
the training split as a whole.
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


def public_private_split_by_class(labels: np.ndarray, public_fraction: float, seed: int,
                                  public_classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Splits range(N) into public indices drawn from `public_classes` only, and private ones.

  Args:
    labels: int [N], the training split's labels.
    public_fraction: the public part has round(public_fraction * N) examples (N: all of them,
      so 0.1 means a tenth of the training split, all from `public_classes`).
    seed: with the labels, determines the split.
    public_classes: the labels public examples may have (distinct, non-empty).

  Returns:
    (public_idx, private_idx): sorted int64 arrays, disjoint, covering range(N); the private
    part holds every example of the other classes and the rest of `public_classes`'.

  Raises ValueError if `public_classes` hold fewer than round(public_fraction * N) examples.
  """
  if not 0.0 <= public_fraction <= 1.0:
    raise ValueError(f"public_fraction must be in [0, 1], got {public_fraction}.")
  labels = np.asarray(labels)
  order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(labels))
  eligible = order[np.isin(labels[order], np.asarray(public_classes))]
  num_public = int(round(public_fraction * len(labels)))
  if num_public > len(eligible):
    raise ValueError(f"a public part of {num_public} examples ({public_fraction} of {len(labels)}) "
                     f"cannot come from classes {list(public_classes)}, which hold "
                     f"{len(eligible)}.")
  public = np.sort(eligible[:num_public])
  return public, np.setdiff1d(np.arange(len(labels)), public)


def check_disjoint(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("public", "private")
                   ) -> None:
  """Raises OverlapError if the index arrays `a` [n] and `b` [m] share an index."""
  overlap = np.intersect1d(a, b)
  if overlap.size:
    raise OverlapError(
        f"{names[0]} and {names[1]} indices overlap in {overlap.size} examples (first: "
        f"{overlap[:5].tolist()}). Private examples must never be used as {names[0]} data: "
        "build both from one public_private_split.")


def split_dataset(dataset: Dataset, public_fraction: float, seed: int,
                  public_classes: tuple[int, ...] = ()) -> PublicPrivate:
  """Splits one dataset into disjoint public and private parts (see `public_private_split`;
  with `public_classes`, `public_private_split_by_class`)."""
  if public_classes:
    if max(public_classes) >= dataset.num_classes or min(public_classes) < 0:
      raise ValueError(f"public classes {list(public_classes)} are not all labels of "
                       f"{dataset.name} (0..{dataset.num_classes - 1}).")
    public_idx, private_idx = public_private_split_by_class(dataset.labels, public_fraction, seed,
                                                            public_classes)
  else:
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
