"""Runs the README's code example on a small model and random data, so the docs cannot rot."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


RECIPES = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
           if 'print("epsilon:"' in b]


def test_the_readme_has_both_recipes():
  assert len(RECIPES) == 2 and "make_private_with_epsilon" in RECIPES[0]


@pytest.mark.parametrize("block", RECIPES, ids=["one_call", "from_parts"])
def test_readme_example_runs_and_trains(capsys, block):
  rng = np.random.default_rng(0)
  train_x = rng.standard_normal((512, 8, 8, 1)).astype(np.float32)
  train_y = (train_x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
  model = nn.Sequential([lambda x: x.reshape((x.shape[0], -1)), nn.Dense(2)])
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  scope = dict(model=model, params=params, train_x=train_x, train_y=train_y)
  exec(compile(block, str(README), "exec"), scope)
  eps = float(capsys.readouterr().out.split("epsilon:")[1])
  assert 2.9 < eps <= 3.0
  assert scope["params"] is not params


def test_readme_nnx_example_runs():
  from flax import nnx
  block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
               if "dp_nnx" in b)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
      self.out = nnx.Linear(4 * 8 * 8, 2, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.norm(self.conv(x)))
      return self.out(x.reshape(x.shape[0], -1))

  model = Net(nnx.Rngs(0))
  scope = dict(model=model)
  exec(compile(block, str(README), "exec"), scope)
  before = jnp.array(model.out.kernel[...])
  batch = {"image": jnp.ones((64, 8, 8, 1)), "label": jnp.zeros((64,), jnp.int32)}
  scope["train_step"](model, scope["optimizer"], batch, jnp.ones(64).at[60:].set(0))
  assert not np.allclose(before, model.out.kernel[...])
