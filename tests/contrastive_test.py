"""Logit-DP and the naive per-row baseline (dpjax.contrastive).

The efficient sums are compared with references that form every per-pair / per-row gradient with
jax.grad, and the stated sensitivities are attacked numerically: random batches, adversarial
examples (a view whose embedding is almost zero, so its pair gradients are huge), coherent batches
and gradient ascent on the added example, for several batch sizes.
"""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import contrastive

IN, HIDDEN, DIM = 10, 8, 4


def mlp_embed(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def mlp_params(seed):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return dict(w1=jax.random.normal(k[0], (IN, HIDDEN)), b1=0.1 * jax.random.normal(k[1], (HIDDEN,)),
              w2=jax.random.normal(k[2], (HIDDEN, DIM)) / 3, b2=jnp.zeros(DIM))


def views(seed, n):
  ka, kb = jax.random.split(jax.random.PRNGKey(1000 + seed))
  xa = jax.random.normal(ka, (n, IN))
  return xa, xa + 0.3 * jax.random.normal(kb, (n, IN))


def tree_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(tree))))


def tree_diff(a, b):
  return tree_norm(jax.tree_util.tree_map(jnp.subtract, a, b))


def assert_trees_close(a, b, rtol=2e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(y))))


class ConvEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME")(x))
    return nn.Dense(DIM)(x.reshape((x.shape[0], -1)))


def conv_setup(n):
  model = ConvEncoder()
  x = jax.random.uniform(jax.random.PRNGKey(3), (2 * n, 6, 6, 1))
  params = model.init(jax.random.PRNGKey(4), x[:1])["params"]
  return (lambda p, v: model.apply({"params": p}, v)), params, x[:n], x[n:]


def mlp_setup(n):
  return (mlp_embed, mlp_params(0)) + views(0, n)


# ------------------------------------------------------------------------------------------------
# References: every pair / row gradient by jax.grad
def reference_logit_dp(embed, params, xa, xb, mask, tau, clip):
  sims = contrastive.similarities(embed(params, xa), embed(params, xb))
  coef = jax.grad(contrastive.info_nce_loss)(sims, mask, tau)
  pair_sim = lambda p, u, v: contrastive.similarities(embed(p, u[None]), embed(p, v[None]))[0, 0]
  total = jax.tree_util.tree_map(jnp.zeros_like, params)
  for i in range(len(xa)):
    for j in range(len(xb)):
      g = jax.grad(pair_sim)(params, xa[i], xb[j])
      w = coef[i, j] * min(1.0, clip / max(tree_norm(g), 1e-30))
      total = jax.tree_util.tree_map(lambda t, x: t + w * x, total, g)
  return total


def reference_naive(embed, params, xa, xb, mask, tau, clip):
  def row_loss(p, i):
    sims = contrastive.similarities(embed(p, xa), embed(p, xb))
    return contrastive.info_nce_rows(sims, mask, tau)[i]

  total = jax.tree_util.tree_map(jnp.zeros_like, params)
  for i in range(len(xa)):
    g = jax.grad(row_loss)(params, i)
    w = float(mask[i]) * min(1.0, clip / max(tree_norm(g), 1e-30))
    total = jax.tree_util.tree_map(lambda t, x: t + w * x, total, g)
  return total


@pytest.mark.parametrize("setup", [mlp_setup, conv_setup], ids=["mlp", "conv"])
@pytest.mark.parametrize("row_chunk", [3, 8])
def test_logit_dp_equals_materialised_pair_gradients(setup, row_chunk):
  embed, params, xa, xb = setup(6)
  mask = jnp.array([True, True, False, True, True, True])
  terms = contrastive.pair_terms(embed, params, xa, xb, mask, 0.7)
  clip = float(jnp.median(jnp.sqrt(contrastive.pair_sq_norms(terms))))  # clips about half
  got = contrastive.logit_dp_grad_sum(embed, params, xa, xb, mask, temperature=0.7,
                                      pair_clip_norm=clip, row_chunk=row_chunk, jacobian_chunk=4)
  assert 0.2 < float(got.clipped_fraction) < 0.8
  assert_trees_close(got.grad_sum, reference_logit_dp(embed, params, xa, xb, mask, 0.7, clip))


@pytest.mark.parametrize("setup", [mlp_setup, conv_setup], ids=["mlp", "conv"])
@pytest.mark.parametrize("pair_method,row_chunk", [("jacobian", 4), ("ghost", 4), ("ghost", 1)])
def test_naive_equals_materialised_row_gradients(setup, pair_method, row_chunk):
  embed, params, xa, xb = setup(6)
  mask = jnp.array([True, False, True, True, True, True])
  terms = contrastive.pair_terms(embed, params, xa, xb, mask, 0.7)
  clip = float(jnp.median(jnp.sqrt(contrastive.row_sq_norms(terms))))
  got = contrastive.naive_grad_sum(embed, params, xa, xb, mask, temperature=0.7,
                                   row_clip_norm=clip, row_chunk=row_chunk,
                                   pair_method=pair_method)
  assert 0 < float(got.clipped_fraction) < 1
  assert_trees_close(got.grad_sum, reference_naive(embed, params, xa, xb, mask, 0.7, clip))


def test_unclipped_sums_equal_the_loss_gradient():
  embed, params, xa, xb = mlp_setup(5)
  mask = jnp.ones(5, bool)
  exact = contrastive.nonprivate_grad_sum(embed, params, xa, xb, mask, temperature=0.5)
  for method, kw in ((contrastive.logit_dp_grad_sum, dict(pair_clip_norm=1e9)),
                     (contrastive.naive_grad_sum, dict(row_clip_norm=1e9))):
    got = method(embed, params, xa, xb, mask, temperature=0.5, **kw)
    assert float(got.clipped_fraction) == 0.0
    np.testing.assert_allclose(got.loss, exact.loss, rtol=1e-6)
    assert_trees_close(got.grad_sum, exact.grad_sum, rtol=1e-4)


def test_padding_rows_contribute_nothing_whatever_they_hold():
  embed, params, xa, xb = mlp_setup(6)
  mask = jnp.array([True, True, True, True, False, False])
  junk_a, junk_b = xa.at[4:].set(1e3), xb.at[4:].set(-7.0)
  for method, kw in ((contrastive.logit_dp_grad_sum, dict(pair_clip_norm=0.3)),
                     (contrastive.naive_grad_sum, dict(row_clip_norm=0.3))):
    a = method(embed, params, xa, xb, mask, temperature=1.0, **kw)
    b = method(embed, params, junk_a, junk_b, mask, temperature=1.0, **kw)
    c = method(embed, params, xa[:4], xb[:4], mask[:4], temperature=1.0, **kw)
    assert_trees_close(a.grad_sum, b.grad_sum)
    assert_trees_close(a.grad_sum, c.grad_sum)
    empty = method(embed, params, xa, xb, jnp.zeros(6, bool), temperature=1.0, **kw)
    assert tree_norm(empty.grad_sum) == 0.0 and float(empty.loss) == 0.0


def _shapes_in_jaxpr(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(var.aval.shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _shapes_in_jaxpr(sub)


@pytest.mark.parametrize("row_chunk,materialised", [(2, False), (8, True)])
def test_logit_dp_never_holds_every_pair_gradient(row_chunk, materialised):
  n = 8
  embed, params, xa, xb = mlp_setup(n)
  fn = lambda p: contrastive.logit_dp_grad_sum(embed, p, xa, xb, jnp.ones(n, bool),
                                               temperature=1.0, pair_clip_norm=1.0,
                                               row_chunk=row_chunk).grad_sum
  shapes = set(_shapes_in_jaxpr(jax.make_jaxpr(fn)(params).jaxpr))
  every_pair = {(n, n) + leaf.shape for leaf in jax.tree_util.tree_leaves(params)
                if leaf.ndim == 2}
  assert bool(shapes & every_pair) == materialised
  assert any(s[:2] == (row_chunk, n) and len(s) == 4 for s in shapes)  # a block of pair grads


# ------------------------------------------------------------------------------------------------
# Sensitivity, attacked
def tiny_embedding_input(params, seed):
  """A view whose embedding norm is ~1e-4: its pair gradients are ~1e4 times the usual size."""
  # The hidden pre-activation x·W1 + b1 = 0 has exact solutions (10 unknowns, 8 equations); then
  # the hidden layer and the embedding are 0, and a small step away makes them small.
  x = jnp.linalg.lstsq(params["w1"].T, -params["b1"])[0]
  x = x + 1e-4 * jax.random.normal(jax.random.PRNGKey(seed), (IN,))
  norm = float(jnp.linalg.norm(mlp_embed(params, x[None])))
  assert 1e-7 < norm < 1e-3, norm
  return x


def make_change(method, params, tau=1.0, clip=1.0):
  """change(xa, xb, added, replacement) = ‖sum(D) − sum(D')‖ for D' = D without example 0 and for
  D' = D with example 0's views replaced; D holds views xa, xb [n, IN] with row 0 set to added."""
  fn = (functools.partial(contrastive.logit_dp_grad_sum, pair_clip_norm=clip)
        if method == "logit_dp" else functools.partial(contrastive.naive_grad_sum,
                                                       row_clip_norm=clip))
  run = lambda a, b, m: fn(mlp_embed, params, a, b, m, temperature=tau).grad_sum
  norm = lambda t: jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(t)))

  @jax.jit
  def change(xa, xb, added, replacement):
    mask = jnp.ones(xa.shape[0], bool)
    a, b = xa.at[0].set(added[0]), xb.at[0].set(added[1])
    full = run(a, b, mask)
    removed = run(a, b, mask.at[0].set(False))
    replaced = run(xa.at[0].set(replacement[0]), xb.at[0].set(replacement[1]), mask)
    return (norm(jax.tree_util.tree_map(jnp.subtract, full, removed)),
            norm(jax.tree_util.tree_map(jnp.subtract, full, replaced)))
  return change


def worst_changes(method, n):
  """The largest (remove, replace) changes over random and adversarial batches and examples."""
  params = mlp_params(n)
  change = make_change(method, params)
  tiny = tiny_embedding_input(params, n)
  worst = np.zeros(2)
  for coherent in (False, True):
    xa, xb = views(n, n)
    if coherent:  # every example's embedding alike, so the added column weighs in every row
      xa = xa[:1] + 0.1 * (xa - xa[:1])
      xb = xa + 0.05 * xb
    added = [jnp.stack([xa[1], tiny]), jnp.stack([tiny, tiny]), jnp.stack([tiny, xb[1]]),
             jnp.stack([1e3 * xa[2], -1e3 * xb[3]]), jnp.zeros((2, IN)), jnp.stack([xa[1], xb[2]])]
    for i, example in enumerate(added):
      worst = np.maximum(worst, np.array(change(xa, xb, example, added[i - 1])))
  return worst


@pytest.fixture(scope="module")
def attacked():
  return {(m, n): worst_changes(m, n) for m in ("logit_dp", "naive") for n in (4, 16, 64)}


@pytest.mark.parametrize("n", [4, 16, 64])
def test_logit_dp_change_stays_within_its_batch_size_free_bound(attacked, n):
  remove, replace = attacked["logit_dp", n]
  bound_remove = contrastive.logit_dp_sensitivity(1.0, 1.0, n, "add_remove")
  bound_replace = contrastive.logit_dp_sensitivity(1.0, 1.0, n, "replace_one")
  assert remove <= bound_remove * (1 + 1e-4), (remove, bound_remove)
  assert replace <= bound_replace * (1 + 1e-4), (replace, bound_replace)
  assert bound_remove < contrastive.logit_dp_sensitivity(1.0, 1.0) == pytest.approx(2 + 2 * np.e**2)


@pytest.mark.parametrize("n", [4, 16, 64])
def test_naive_change_stays_within_its_bound(attacked, n):
  remove, replace = attacked["naive", n]
  assert remove <= contrastive.naive_sensitivity(1.0, n, "add_remove") * (1 + 1e-4)
  assert replace <= contrastive.naive_sensitivity(1.0, n, "replace_one") * (1 + 1e-4)


def test_naive_sensitivity_grows_with_the_batch_and_logit_dp_does_not(attacked):
  naive = [attacked["naive", n][0] for n in (4, 16, 64)]
  logit = [attacked["logit_dp", n][0] for n in (4, 16, 64)]
  # Removing one example moved the naive sum by about n·C: far beyond any batch-size-free bound.
  assert naive[2] > 8 * naive[0] and naive[2] > 0.25 * contrastive.naive_sensitivity(1.0, 64)
  assert naive[2] > contrastive.logit_dp_sensitivity(1.0, 1.0)
  assert max(logit) <= contrastive.logit_dp_sensitivity(1.0, 1.0)
  assert max(logit) > 0.05 * contrastive.logit_dp_sensitivity(1.0, 1.0)  # the attack does bite


# ------------------------------------------------------------------------------------------------
def test_sensitivity_formulas():
  s = lambda n, adj="add_remove", tau=1.0: contrastive.logit_dp_sensitivity(0.5, tau, n, adj)
  assert s(1) == pytest.approx(2 * 0.5)  # a lone example: only its own row
  values = [s(n) for n in (1, 2, 10, 100, 10**6)]
  assert values == sorted(values) and values[-1] < s(None) == pytest.approx(1.0 * (1 + np.e ** 2))
  assert s(50, "replace_one") == pytest.approx(s(50) + 2 * 0.5)
  assert s(10**5, tau=0.01) == pytest.approx(100 * (1 + (10**5 - 1)), rel=1e-9)  # ≈ linear in n
  assert contrastive.naive_sensitivity(0.5, 10) == 9.5
  assert contrastive.naive_sensitivity(0.5, 10, "replace_one") == 10.0


@pytest.mark.parametrize("call,match", [
    (lambda: contrastive.logit_dp_sensitivity(1.0, 0.0), "temperature"),
    (lambda: contrastive.logit_dp_sensitivity(-1.0, 1.0), "pair_clip_norm"),
    (lambda: contrastive.logit_dp_sensitivity(1.0, 1.0, 0), "batch_size"),
    (lambda: contrastive.logit_dp_sensitivity(1.0, 1.0, 8, "swap"), "adjacency"),
    (lambda: contrastive.logit_dp_sensitivity(1.0, 1e-3), "overflows"),
    (lambda: contrastive.naive_sensitivity(1.0, 2.5), "batch_size"),
])
def test_bad_arguments_are_refused(call, match):
  with pytest.raises(ValueError, match=match):
    call()
