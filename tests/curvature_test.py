"""Tests for dpjax.curvature: HVPs and curvature terms against a dense Hessian, the second-order
formulas against hand-computed values, and the refusal of private data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dpjax import curvature
from dpjax.data import public_batch as public_batch_lib
from dpjax.data.dataset import Dataset, to_float
from dpjax.data.splits import split_dataset
from dpjax.privacy import clipping
from tests import toy_models

N = 32  # public batch size of the numerical tests


def _toy_dataset(n=128, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n,) + toy_models.IMAGE_SHAPE, dtype=np.uint8)
  return Dataset(images, rng.integers(0, 3, n).astype(np.int32), 3, "toy", "train")


def _centered(images):
  return 4.0 * (to_float(images) - 0.5)


@pytest.fixture(scope="module")
def setup():
  """Toy dense model (547 params), a public batch of N, and dense references in float64."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model, seed=1)
  loss = toy_models.per_example_loss(model)
  parts = split_dataset(_toy_dataset(), public_fraction=0.5, seed=0)
  batch = public_batch_lib.public_batch(parts.public, np.arange(N), preprocess=_centered)
  flat, unravel = ravel_pytree(params)
  flat_loss = lambda p, ex: loss(unravel(p), ex)
  grad_one = jax.jit(jax.grad(flat_loss))
  data = batch.as_dict()
  # Reference per-example gradients: a Python loop over examples.
  grads = np.stack([np.asarray(grad_one(flat, {k: v[i] for k, v in data.items()}), np.float64)
                    for i in range(N)])
  batch_loss = lambda p: jnp.mean(jax.vmap(flat_loss, in_axes=(None, 0))(p, data))
  dense_h = np.asarray(jax.jit(jax.hessian(batch_loss))(flat), np.float64)
  return dict(params=params, loss=loss, batch=batch, parts=parts, flat=flat, unravel=unravel,
              grads=grads, H=(dense_h + dense_h.T) / 2)


def _close(a, b, rtol):
  assert abs(a - b) <= rtol * max(abs(b), 1e-12), (a, b)


def test_hvp_matches_dense_hessian_and_finite_differences(setup):
  s = setup
  batch_loss = curvature.mean_loss(s["loss"])
  v = np.random.default_rng(1).normal(size=s["flat"].shape)
  v /= np.linalg.norm(v)
  hv = np.asarray(ravel_pytree(curvature.hvp(batch_loss, s["params"], s["batch"],
                                             s["unravel"](jnp.asarray(v, jnp.float32))))[0])
  np.testing.assert_allclose(hv, s["H"] @ v, rtol=0, atol=1e-4 * np.linalg.norm(s["H"] @ v))
  # Central differences of the gradient, step 1e-2 along the unit vector v (float32: ~1e-3 error).
  grad = jax.jit(lambda p: ravel_pytree(jax.grad(batch_loss)(s["unravel"](p),
                                                             s["batch"].as_dict()))[0])
  eps = 1e-2
  fd = (np.asarray(grad(s["flat"] + eps * v), np.float64)
        - np.asarray(grad(s["flat"] - eps * v), np.float64)) / (2 * eps)
  assert np.linalg.norm(hv - fd) <= 1e-2 * np.linalg.norm(fd)


def test_hutchinson_trace_matches_dense_trace(setup):
  s = setup
  est = curvature.hutchinson_trace(curvature.mean_loss(s["loss"]), s["params"], s["batch"],
                                   jax.random.key(0), num_probes=100)
  exact = np.trace(s["H"])
  # False failure: t_99 tail beyond 4 standard errors, ~1e-4 (the seed is fixed).
  assert est.num_probes == 100 and est.stderr > 0
  assert abs(est.mean - exact) <= 4 * est.stderr, (est, exact)
  # The standard error matches the exact one, sqrt(2 Σ_{i≠j} H_ij² / m), within a factor 2
  # (false failure < 1e-3 even for a chi-square-like rank-one H).
  exact_se = math.sqrt(2 * (np.sum(s["H"] ** 2) - np.sum(np.diag(s["H"]) ** 2)) / 100)
  assert 0.5 < est.stderr / exact_se < 2.0, (est.stderr, exact_se)


def _dense_terms(s, unbiased, num_quad=N):
  """GᵀHG, ‖G‖², tr(HΣ) from the looped per-example gradients and the dense Hessian."""
  g, h, n = s["grads"], s["H"], N
  pair_h, pair = g @ h @ g.T, g @ g.T  # [n, n]: g_iᵀHg_j, ⟨g_i, g_j⟩
  off = ~np.eye(n, dtype=bool)
  mean_g = g.mean(0)
  if num_quad < n:  # the subset formula: n/(n-1) (mean_{i<s} g_iᵀHg_i − ĜᵀHĜ)
    quad, q = np.mean(np.diag(pair_h)[:num_quad]), mean_g @ h @ mean_g
    return (n * q - quad) / (n - 1), None, n / (n - 1) * (quad - q)
  if unbiased:
    return (pair_h[off].sum() / (n * (n - 1)), pair[off].sum() / (n * (n - 1)),
            np.sum(h * np.cov(g.T, ddof=1)))
  return mean_g @ h @ mean_g, mean_g @ mean_g, np.sum(h * np.cov(g.T, ddof=0))


@pytest.mark.parametrize("estimator", ["unbiased", "plugin"])
def test_curvature_terms_match_dense_references(setup, estimator):
  s = setup
  terms = curvature.curvature_terms(s["loss"], s["params"], s["batch"], clipping.FlatClip(1e6),
                                    jax.random.key(1), num_probes=64, max_quad_examples=None,
                                    estimator=estimator)
  ghg, gsq, ths = _dense_terms(s, estimator == "unbiased")
  _close(terms.gHg, ghg, 2e-3)
  _close(terms.grad_norm_sq, gsq, 2e-3)
  _close(terms.trace_h_sigma, ths, 2e-3)
  # False failure ~1e-4 (t_63 beyond 4 standard errors).
  assert abs(terms.trace_h - np.trace(s["H"])) <= 4 * terms.trace_h_stderr
  _close(terms.mean_grad_norm, np.linalg.norm(s["grads"], axis=1).mean(), 1e-5)
  assert terms.num_examples == N and terms.sensitivity == 1e6


def test_trace_h_sigma_on_a_subset(setup):
  s = setup
  terms = curvature.curvature_terms(s["loss"], s["params"], s["batch"], clipping.FlatClip(1e6),
                                    jax.random.key(1), num_probes=64, max_quad_examples=8)
  ghg, _, ths = _dense_terms(s, True, num_quad=8)
  _close(terms.gHg, ghg, 2e-3)
  _close(terms.trace_h_sigma, ths, 2e-3)


@pytest.mark.parametrize("rule, expected", [
    (clipping.FlatClip(1e6), lambda norms: 1.0),
    (clipping.AutomaticClip(0.5, 0.01), lambda norms: np.mean(0.5 / (norms + 0.01))),
    (clipping.FlatClip(0.3), lambda norms: np.mean(np.minimum(1.0, 0.3 / norms))),
])
def test_clip_factor(setup, rule, expected):
  s = setup
  terms = curvature.curvature_terms(s["loss"], s["params"], s["batch"], rule, jax.random.key(2),
                                    num_probes=64, max_quad_examples=None)
  norms = np.linalg.norm(s["grads"], axis=1)
  _close(terms.clip_factor, expected(norms), 1e-5)
  assert terms.sensitivity == rule.sensitivity


def test_unhashable_group_clip_rule_works(setup):
  s = setup
  rule = clipping.per_layer_clip(s["params"], 0.1)  # holds a dict: not hashable
  terms = curvature.curvature_terms(s["loss"], s["params"], s["batch"], rule, jax.random.key(2),
                                    num_probes=64, max_quad_examples=None)
  assert 0 < terms.clip_factor <= 1 and terms.sensitivity == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------
# The formulas, against values computed by hand from made-up terms.

TERMS = curvature.CurvatureTerms(grad_norm_sq=2.0, gHg=3.0, trace_h=50.0, trace_h_stderr=1.0,
                                 trace_h_sigma=10.0, clip_factor=0.25, mean_grad_norm=4.0,
                                 sensitivity=2.0, num_examples=64)


def test_formulas_against_hand_computed_values():
  # σ = 1.5, R = 2, c = 1/4, B = 100: σ²R² tr(H) = 2.25·4·50 = 450.
  assert curvature.decelerator(TERMS, 100, 1.5) == pytest.approx(450 / (100 * 0.0625))  # 72
  assert curvature.loss_improvement_sgd(TERMS, 100) == pytest.approx(4 / (2 * 3.1))
  # Noise term per iteration: 450 / (100² · 0.0625) = 0.72.
  assert curvature.loss_improvement_dp(TERMS, 100, 1.5) == pytest.approx(4 / (2 * 3.82))
  assert curvature.optimal_batch_size(TERMS, 1.5) == pytest.approx(12 * math.sqrt(50 / 3))
  # V_pub = 10/50 = 0.2, V_priv = 10/100 + 0.72 = 0.82.
  assert curvature.optimal_alpha(TERMS, 50, 100, 1.5) == pytest.approx(0.82 / 1.02)


def test_optimal_batch_size_minimises_the_per_sample_denominator():
  b_op = curvature.optimal_batch_size(TERMS, 1.5)
  per_sample = lambda b: b / curvature.loss_improvement_dp(TERMS, b, 1.5)
  assert per_sample(b_op) < min(per_sample(0.9 * b_op), per_sample(1.1 * b_op))


def test_no_noise_means_no_decelerator():
  assert curvature.decelerator(TERMS, 100, 0.0) == 0.0
  assert curvature.loss_improvement_dp(TERMS, 100, 0.0) == curvature.loss_improvement_sgd(
      TERMS, 100)
  assert curvature.optimal_batch_size(TERMS, 0.0) == 0.0


def test_optimal_alpha_in_unit_interval_and_tends_to_one():
  sigmas = [0.0, 0.1, 1.0, 10.0, 1e3, 1e6]
  alphas = [curvature.optimal_alpha(TERMS, 50, 100, s) for s in sigmas]
  assert alphas == sorted(alphas) and alphas[-1] > 1 - 1e-9
  assert alphas[0] == pytest.approx(0.1 / 0.3)  # σ = 0: (1/100) / (1/50 + 1/100)
  rng = np.random.default_rng(0)
  for _ in range(200):  # random, partly negative, estimates
    t = TERMS._replace(trace_h=rng.normal(0, 50), trace_h_sigma=rng.normal(0, 10),
                       clip_factor=abs(rng.normal()))
    alpha = curvature.optimal_alpha(t, rng.integers(1, 100), rng.integers(1, 1000),
                                    abs(rng.normal(0, 3)))
    assert 0.0 <= alpha <= 1.0


def test_degenerate_terms():
  zero_c = TERMS._replace(clip_factor=0.0)
  assert curvature.decelerator(zero_c, 100, 1.0) == math.inf
  assert curvature.loss_improvement_dp(zero_c, 100, 1.0) == 0.0
  assert curvature.optimal_batch_size(zero_c, 1.0) == math.inf
  assert curvature.optimal_alpha(zero_c, 50, 100, 1.0) == 1.0
  assert curvature.decelerator(zero_c, 100, 0.0) == 0.0
  assert curvature.optimal_batch_size(TERMS._replace(gHg=-1.0), 1.0) == math.inf
  assert curvature.loss_improvement_sgd(TERMS._replace(gHg=-1.0), 100) == math.inf
  assert curvature.loss_improvement_sgd(TERMS._replace(grad_norm_sq=-0.1), 100) == 0.0
  assert curvature.optimal_alpha(TERMS._replace(trace_h_sigma=0.0, trace_h=0.0), 5, 5, 1.0) == 1.0


# ------------------------------------------------------------------------------------------------
# Privacy: the API refuses anything but a PublicBatch (its guard: tests/data_public_batch_test.py).


def test_anything_but_a_public_batch_is_refused(setup):
  s = setup
  as_dict = s["parts"].private  # the private arrays, handed over as a plain dict
  raw = dict(image=jnp.asarray(_centered(as_dict.images[:8])),
             label=jnp.asarray(as_dict.labels[:8]))
  batch_loss = curvature.mean_loss(s["loss"])
  with pytest.raises(TypeError, match="PublicBatch"):
    curvature.hvp(batch_loss, s["params"], raw, s["params"])
  with pytest.raises(TypeError, match="PublicBatch"):
    curvature.hutchinson_trace(batch_loss, s["params"], raw, jax.random.key(0), 4)
  with pytest.raises(TypeError, match="PublicBatch"):
    curvature.curvature_terms(s["loss"], s["params"], raw, clipping.FlatClip(1.0),
                              jax.random.key(0))


def test_dp_efficiency_is_the_dp_share_of_a_non_private_step():
  # B = 100, σ = 1.5: bracket 3 + 10/100 = 3.1, noise term per iteration 0.72 (as above).
  assert curvature.dp_efficiency(TERMS, 100, 1.5) == pytest.approx(3.1 / 3.82)
  assert curvature.dp_efficiency(TERMS, 100, 1.5) == pytest.approx(
      curvature.loss_improvement_dp(TERMS, 100, 1.5) / curvature.loss_improvement_sgd(TERMS, 100))
  assert curvature.dp_efficiency(TERMS, 100, 0.0) == 1.0
  assert curvature.dp_efficiency(TERMS._replace(clip_factor=0.0), 100, 1.0) == 0.0
  assert math.isnan(curvature.dp_efficiency(TERMS._replace(trace_h=-5.0), 100, 1.0))
  assert math.isnan(curvature.dp_efficiency(TERMS._replace(gHg=-1.0), 100, 1.0))
  # More noise, or a smaller batch, keeps less of the step.
  assert (curvature.dp_efficiency(TERMS, 100, 3.0) < curvature.dp_efficiency(TERMS, 100, 1.5)
          < curvature.dp_efficiency(TERMS, 1000, 1.5))


def _adam_reference(grads, clipped, batch_size, noise_std):
  """r_Adam from per-example gradients [n, d] (float64), written out coordinate by coordinate."""
  n, half = len(grads), len(grads) // 2
  def terms(g):
    return (g[:half].mean(0), g[half:2 * half].mean(0), g.mean(0), g.var(0, ddof=1))
  a, b, m, v = terms(grads)
  ac, bc, mc, vc = terms(clipped)
  p_sgd = np.sum(a * b / np.sqrt(np.maximum(m ** 2 - v / n, 0) + v / batch_size))
  p_dp = np.sum((a * bc + b * ac) / 2 / np.sqrt(
      np.maximum(mc ** 2 - vc / n, 0) + vc / batch_size + noise_std ** 2))
  return min(max(p_dp / p_sgd, 0.0), 1.0) if p_sgd > 0 else math.nan


@pytest.fixture(scope="module")
def repeated(setup):
  """A public batch of N made of 4 examples repeated (so the mean gradient stands out of the
  per-example spread) and its per-example gradients [N, d] by a Python loop."""
  s = setup
  base = _toy_dataset(n=8, seed=3)
  rows = np.tile(np.arange(4), N // 4)
  images, labels = base.images[rows], base.labels[rows]
  parts = split_dataset(Dataset(np.concatenate([images, images]),
                                np.concatenate([labels, labels]), 3, "toy", "train"), 0.5, 0)
  batch = public_batch_lib.public_batch(parts.public, np.arange(N), preprocess=_centered)
  grad_one = jax.jit(jax.grad(lambda p, ex: s["loss"](s["unravel"](p), ex)))
  data = batch.as_dict()
  grads = np.stack([np.asarray(grad_one(s["flat"], {k: v[i] for k, v in data.items()}),
                               np.float64) for i in range(N)])
  return dict(s, batch=batch, grads=grads)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 2.0])
def test_adam_dp_efficiency_matches_a_per_coordinate_reference(repeated, sigma):
  s = repeated
  rule = clipping.FlatClip(0.05)  # clips most of the toy's per-example gradients
  clipped = np.stack([np.asarray(ravel_pytree(rule.clip(s["unravel"](g))[0])[0], np.float64)
                      for g in s["grads"]])
  assert np.mean(np.linalg.norm(s["grads"], axis=1) > 0.05) > 0.5
  got = curvature.adam_dp_efficiency(s["loss"], s["params"], s["batch"], rule, 256, sigma)
  want = _adam_reference(s["grads"], clipped, 256, sigma * 0.05 / 256)
  assert 0 < want < 1 or sigma == 0
  _close(got, want, 1e-3)


def test_adam_dp_efficiency_has_no_evidence_when_the_batch_shows_no_progress(setup):
  """Random labels at a random init: the halves' mean gradients disagree (P_sgd <= 0): NaN."""
  assert math.isnan(curvature.adam_dp_efficiency(setup["loss"], setup["params"], setup["batch"],
                                                 clipping.FlatClip(1.0), 256, 1.0))


def test_adam_dp_efficiency_is_one_without_clipping_or_noise_and_falls_with_noise(repeated):
  s = repeated
  no_clip = clipping.FlatClip(1e9)
  efficiency = lambda sigma, b=256: curvature.adam_dp_efficiency(
      s["loss"], s["params"], s["batch"], no_clip, b, sigma)
  assert efficiency(0.0) == pytest.approx(1.0, abs=1e-5)
  assert efficiency(1e-3) > efficiency(1e5) >= 0.0  # with R = 1e9, σR/B is huge at σ = 1e5
  assert efficiency(1e3, 256) < efficiency(1e3, 4096)
  with pytest.raises(TypeError):
    curvature.adam_dp_efficiency(s["loss"], s["params"], s["batch"].as_dict(), no_clip, 256, 1.0)
