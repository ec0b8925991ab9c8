"""PublicBatch: public by construction (dpjax.data.public_batch)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.data import public_batch as public_batch_lib
from dpjax.data.dataset import Dataset
from dpjax.data.splits import split_dataset


def _parts():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
  toy = Dataset(images, rng.integers(0, 3, 40).astype(np.int32), 3, "toy", "train")
  return split_dataset(toy, public_fraction=0.5, seed=0)


def test_a_public_part_gives_a_preprocessed_batch():
  public = _parts().public
  batch = public_batch_lib.public_batch(public, np.array([0, 3, 5]), preprocess=lambda x: x / 2.0)
  assert len(batch) == 3 and batch.image.dtype == jnp.float32
  np.testing.assert_allclose(batch.image, public.images[[0, 3, 5]] / 2.0)
  np.testing.assert_array_equal(batch.label, public.labels[[0, 3, 5]])
  assert set(batch.as_dict()) == {"image", "label"} and "public" in batch.source


def test_private_part_is_refused():
  private = _parts().private
  with pytest.raises(public_batch_lib.PrivateDataError, match="public"):
    public_batch_lib.public_batch(private, np.arange(4))
  with pytest.raises(public_batch_lib.PrivateDataError):  # a part of the private part is still private
    public_batch_lib.public_batch(private.subset(np.arange(4), "public"), np.arange(4))
  assert issubclass(public_batch_lib.PrivateDataError, ValueError)


def test_only_public_batch_builds_one_and_bad_input_is_refused():
  parts = _parts()
  with pytest.raises(TypeError, match="public_batch"):
    public_batch_lib.PublicBatch(jnp.zeros((2, 4, 4, 1)), jnp.zeros(2, jnp.int32), "x")
  with pytest.raises(TypeError, match="Dataset"):
    public_batch_lib.public_batch(dict(image=parts.public.images), np.arange(2))
  with pytest.raises(ValueError, match="indices"):
    public_batch_lib.public_batch(parts.public, np.array([], np.int64))
  with pytest.raises(ValueError, match="indices must lie"):
    public_batch_lib.public_batch(parts.public, np.array([len(parts.public)]))
  with pytest.raises(TypeError, match="PublicBatch"):
    public_batch_lib.require_public(dict(image=parts.public.images), "test")
