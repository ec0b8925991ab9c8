"""Tests for dpjax.train.per_example: the choice of perf.per_example_method."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dpjax.privacy import ghost
from dpjax.train import per_example
from tests import toy_models


class WithBareParam(nn.Module):
  """A Dense layer ghost reads, and a bare parameter no supported layer owns."""
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (3,))
    return nn.Dense(3)(x.reshape((x.shape[0], -1))) * scale


class BatchCentred(nn.Module):
  """Mixes examples: subtracts the batch mean of its hidden units."""
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x.reshape((x.shape[0], -1)))
    return nn.Dense(3)(h - h.mean(axis=0, keepdims=True))


def _choose(model, requested):
  params = toy_models.init(model)
  return per_example.choose(requested, toy_models.batch_losses(model), params,
                            toy_models.IMAGE_SHAPE, 3, lambda images: images / 255.0)


def test_auto_takes_ghost_and_names_the_parameters_left_to_per_example_gradients():
  assert _choose(toy_models.MODELS["conv"], "auto") == (
      "ghost", "ghost clipping; every trainable parameter on the ghost path")
  method, why = _choose(WithBareParam(), "auto")
  assert method == "ghost" and why.endswith("for the 1 parameters no supported layer owns "
                                            "alone: scale")


def test_auto_falls_back_to_vmap_for_a_model_that_mixes_examples_and_ghost_refuses_it():
  method, why = _choose(BatchCentred(), "auto")
  assert method == "vmap" and "ghost clipping cannot take this model" in why
  with pytest.raises(ghost.ExamplesMixedError):
    _choose(BatchCentred(), "ghost")
  assert _choose(BatchCentred(), "vmap")[0] == "vmap"  # no check: vmap keeps examples apart
  with pytest.raises(ValueError, match="per_example_method"):
    _choose(BatchCentred(), "jacobian")


def test_fallback_leaves_respects_the_trainable_mask():
  model = WithBareParam()
  params = toy_models.init(model)
  batch = dict(image=jnp.zeros((2,) + toy_models.IMAGE_SHAPE), label=jnp.zeros(2, jnp.int32))
  losses = toy_models.batch_losses(model)
  assert per_example.fallback_leaves(losses, params, batch) == ["scale"]
  frozen = jax.tree_util.tree_map(lambda _: False, params)
  assert per_example.fallback_leaves(losses, params, batch, frozen) == []
