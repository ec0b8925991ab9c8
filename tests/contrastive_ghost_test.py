"""Logit-DP without embedding Jacobians (dpjax.contrastive_ghost, pair_method="ghost").

The layer-by-layer pair norms and clipped sums are compared with the Jacobian path and with
per-pair jax.grad; each pair's clipped contribution, formed alone by the same sums, is held to
the clip bound (near-zero embeddings, bfloat16); unsupported layers fall back or raise.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import config as config_lib, contrastive, contrastive_ghost
from dpjax.privacy import clipping, ghost
from tests import contrastive_test

IN, DIM = 10, 4


class Mlp(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(8, dtype=self.dtype)(x))
    return nn.Dense(DIM, dtype=self.dtype)(x).astype(jnp.float32)


class ConvGroupNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME")(x)
    x = jnp.tanh(nn.GroupNorm(num_groups=1)(x))
    return nn.Dense(DIM)(x.reshape((x.shape[0], -1)))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + jnp.tanh(nn.Dense(x.shape[-1])(x)), None


class Scanned(nn.Module):
  """Two Dense blocks as one nn.scan (stacked params; ghost's terms carry the scanned axis)."""
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x)
    x, _ = nn.scan(Block, variable_axes={True: 0}, split_rngs={"params": True}, length=2)()(
        x, None)
    return nn.Dense(DIM)(x)


class Scaled(nn.Module):
  """A param no supported layer owns (`scale`): it goes to the fallback."""
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(DIM)(jnp.tanh(nn.Dense(8)(x)))
    return x * self.param("scale", lambda key, shape: 1.0 + 0.3 * jax.random.normal(key, shape),
                          (DIM,))


def setup(model, n, image=False):
  """(embed_fn with ghost variables, params, views_a, views_b) for `model` and n examples."""
  shape = (2 * n, 6, 6, 1) if image else (2 * n, IN)
  x = jax.random.uniform(jax.random.PRNGKey(3), shape, minval=-1.0)
  params = model.init(jax.random.PRNGKey(4), x[:1])["params"]

  def embed(p, views, ghost_variables=None):
    out = ghost.apply_model(model, p, views, ghost_variables)
    return out if ghost_variables is None else (out[0], out[1])
  return embed, params, x[:n], x[n:]


MODELS = {"mlp": lambda n: setup(Mlp(), n), "conv": lambda n: setup(ConvGroupNorm(), n, True),
          "scan": lambda n: setup(Scanned(), n), "fallback": lambda n: setup(Scaled(), n)}
MASK = jnp.array([True, True, False, True, True, True])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("row_chunk", [1, 3])
def test_ghost_equals_the_jacobian_path(name, row_chunk):
  embed, params, xa, xb = MODELS[name](6)
  terms = contrastive.pair_terms(embed, params, xa, xb, MASK, 0.7)
  sq = contrastive.pair_sq_norms(terms)
  clip = float(jnp.median(jnp.sqrt(sq)))  # clips about half
  got = contrastive.ghost_pairs(embed, params, xa, xb, MASK, temperature=0.7,
                                pair_clip_norm=clip, row_chunk=row_chunk)
  np.testing.assert_allclose(got.sq_norms, sq, rtol=1e-5, atol=1e-5 * float(jnp.max(sq)))
  kw = dict(temperature=0.7, pair_clip_norm=clip, row_chunk=row_chunk)
  jacobian = contrastive.logit_dp_grad_sum(embed, params, xa, xb, MASK, **kw)
  summed = contrastive.logit_dp_grad_sum(embed, params, xa, xb, MASK, pair_method="ghost", **kw)
  assert 0.2 < float(summed.clipped_fraction) < 0.8
  assert float(summed.clipped_fraction) == float(jacobian.clipped_fraction)
  assert float(summed.loss) == pytest.approx(float(jacobian.loss), rel=1e-6)
  # Clipped pairs' factors come from upper bounds on their norms (rounding included), a few 1e-6
  # above the norms: the sums differ by that; unclipped, by float32 rounding only.
  assert relative_difference(summed.grad_sum, jacobian.grad_sum) <= 1e-5
  if name == "conv":  # and with every pair gradient by jax.grad
    reference = contrastive_test.reference_logit_dp(embed, params, xa, xb, MASK, 0.7, clip)
    assert relative_difference(summed.grad_sum, reference) <= 1e-5
  kw["pair_clip_norm"] = 1e9
  assert relative_difference(
      contrastive.logit_dp_grad_sum(embed, params, xa, xb, MASK, pair_method="ghost", **kw).grad_sum,
      contrastive.logit_dp_grad_sum(embed, params, xa, xb, MASK, **kw).grad_sum) <= 1e-6


def relative_difference(tree, reference):
  return contrastive_test.tree_diff(tree, reference) / contrastive_test.tree_norm(reference)


def test_ghost_holds_no_embedding_jacobian():
  n = 8
  embed, params, xa, xb = MODELS["mlp"](n)
  fn = lambda p: contrastive.logit_dp_grad_sum(embed, p, xa, xb, jnp.ones(n, bool),
                                               temperature=1.0, pair_clip_norm=1.0,
                                               pair_method="ghost").grad_sum
  shapes = set(contrastive_test._shapes_in_jaxpr(jax.make_jaxpr(fn)(params).jaxpr))
  jacobians = {(views, DIM) + leaf.shape for leaf in jax.tree_util.tree_leaves(params)
               for views in (n, 2 * n)}
  assert not shapes & jacobians
  with_jacobians = jax.make_jaxpr(lambda p: contrastive.logit_dp_grad_sum(
      embed, p, xa, xb, jnp.ones(n, bool), temperature=1.0, pair_clip_norm=1.0).grad_sum)
  assert set(contrastive_test._shapes_in_jaxpr(with_jacobians(params).jaxpr)) & jacobians


def alone(embed, params, xa, xb, mask, clip):
  """[n, n, ...]: each pair's clipped contribution factor_ij·g_ij, formed alone by the ghost
  path's own sums (the loss derivatives replaced by a one-hot on the pair)."""
  n = xa.shape[0]

  def contribution(one_hot):
    geometry = lambda ea, eb: dataclasses.replace(
        contrastive.pair_geometry(ea, eb, mask, 1.0), coef=one_hot)
    return contrastive_ghost.clipped_pair_sum(
        embed, params, xa, xb, mask, geometry, pair_clip_norm=clip, shifts_per_block=2,
        jacobians=contrastive.embedding_jacobians).grad_sum
  one_hots = jnp.eye(n * n).reshape(n * n, n, n)
  return jax.vmap(clipping.global_norm)(jax.jit(jax.vmap(contribution))(one_hots))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_every_pair_contribution_stays_within_the_clip_bound(dtype):
  embed, params, xa, xb = setup(Mlp(dtype), 4)
  xa = xa.at[1].set(1e-6 * xa[1])  # embedding ~1e-6: its pairs' gradients are ~1e6 times larger
  xb = xb.at[2].set(50.0 * xb[2])
  clip = 0.05  # every pair scaled down
  norms = alone(embed, params, xa, xb, jnp.ones(4, bool), clip)
  assert float(jnp.min(norms)) > 0.5 * clip  # scaled down, not vanished
  # Within C up to float32 rounding relative to the norm itself (a few ulps, left out on every
  # path), which the global norm of a contribution at exactly C shows.
  assert float(jnp.max(norms)) <= clip * (1 + 1e-6)


def test_unsupported_layers_fall_back_to_their_jacobians_or_raise():
  embed, params, xa, xb = MODELS["fallback"](4)
  kw = dict(temperature=1.0, pair_clip_norm=0.1, fallback="error")
  with pytest.raises(ghost.GhostUnsupportedError, match="scale.*fallback='jacobian'"):
    contrastive.ghost_pairs(embed, params, xa, xb, jnp.ones(4, bool), **kw)
  # With the fallback: equal to the Jacobian path (test_ghost_equals_the_jacobian_path), and only
  # the fallback leaf's Jacobian [2n, d, DIM] is formed.
  fn = lambda p: contrastive.logit_dp_grad_sum(embed, p, xa, xb, jnp.ones(4, bool),
                                               temperature=1.0, pair_clip_norm=0.1,
                                               pair_method="ghost").grad_sum
  shapes = set(contrastive_test._shapes_in_jaxpr(jax.make_jaxpr(fn)(params).jaxpr))
  assert (8, DIM, DIM) in shapes and (8, DIM, 8, DIM) not in shapes


def test_bad_pair_method_is_refused():
  embed, params, xa, xb = MODELS["mlp"](2)
  with pytest.raises(ValueError, match="pair_method"):
    contrastive.logit_dp_grad_sum(embed, params, xa, xb, jnp.ones(2, bool), temperature=1.0,
                                  pair_clip_norm=1.0, pair_method="vmap")
  with pytest.raises(ValueError, match="fallback"):
    contrastive.ghost_pairs(embed, params, xa, xb, jnp.ones(2, bool), temperature=1.0,
                            pair_clip_norm=1.0, fallback="vmap")


def test_padding_rows_contribute_nothing_whatever_they_hold():
  embed, params, xa, xb = MODELS["conv"](6)
  mask = jnp.array([True, True, True, True, False, False])
  run = lambda a, b, m: contrastive.logit_dp_grad_sum(
      embed, params, a, b, m, temperature=1.0, pair_clip_norm=0.3, pair_method="ghost",
      row_chunk=2)
  clean = run(xa, xb, mask)
  junk = run(xa.at[4].set(1e3).at[5].set(jnp.inf), xb.at[4:].set(jnp.nan), mask)
  contrastive_test.assert_trees_close(junk.grad_sum, clean.grad_sum)
  contrastive_test.assert_trees_close(run(xa[:4], xb[:4], mask[:4]).grad_sum, clean.grad_sum)
  assert contrastive_test.tree_norm(run(xa, xb, jnp.zeros(6, bool)).grad_sum) == 0.0


def test_the_config_offers_the_pair_methods_there_are():
  assert config_lib.contrastive_block.PAIR_METHODS == contrastive.PAIR_METHODS
  assert config_lib.default_contrastive_block().pair_method == "jacobian"
