"""Curvature statistics from PUBLIC data: HVPs, tr(H), GᵀHG, tr(HΣ), and the DP "decelerator".

The second-order model of one step (papers.md §2.2, [INFERRED] reconstruction of Bu et al. 2024,
with the clip norm R made explicit). A DP-SGD step on an expected batch of B examples is

    g̃ = (Σ_i C_i g_i + σ R z) / B,   z ~ N(0, I),

with per-example gradients g_i, clipping factors C_i ≈ c (a common scalar) and sensitivity R.
With G = ∇L, H = ∇²L and Σ the per-example gradient covariance, the best learning rate improves
the loss per iteration by

    SGD:  ‖G‖⁴ / (2 [GᵀHG + tr(HΣ)/B])
    DP:   ‖G‖⁴ / (2 [GᵀHG + tr(HΣ)/B + σ²R² tr(H)/(B² c²)])

and σ²R² tr(H)/(B c²) (the per-sample form of the last term) is the decelerator.

Use: `terms = curvature_terms(example_loss, params, public_batch(ds.public, idx), rule, key)`
(`dpjax.data.public_batch`),
then the pure float functions `decelerator`, `loss_improvement_sgd`, `loss_improvement_dp`,
`dp_efficiency`, `optimal_batch_size` and `optimal_alpha` of `terms`.

Privacy: these statistics steer training (switch point, α, batch size) with no noise added, so
they may only read public data. Every function here that reads examples accepts only a
`PublicBatch`, which only `public_batch` builds and which it refuses to build from a dataset part
marked private (`PrivateDataError`); anything else (e.g. a dict of arrays) is a TypeError. The
parameters may come out of DP training: functions of DP outputs and public data are
post-processing and cost no privacy budget. The check trusts the `Dataset.split` label (parts made
by `split_dataset` are labelled); a dataset mislabelled as public defeats it.

Degenerate terms (estimates can be ≤ 0 from probe noise or at a saddle); the float functions never
return silent garbage:
  * σ = 0: the noise term is exactly 0 (decelerator 0, DP improvement = SGD improvement, B_op = 0).
  * c ≤ 0 with σ > 0 (every example clipped to zero; the private gradient is pure noise): noise term
    inf, so decelerator inf, DP improvement 0, B_op inf, α* = 1.
  * improvement denominator ≤ 0 (the quadratic model has no minimum along the step): inf.
    A numerator ‖G‖² ≤ 0 (the unbiased estimate can be < 0 when noise swamps the signal) gives 0.
  * see `optimal_batch_size` and `optimal_alpha` for their own cases.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.data.public_batch import PublicBatch, require_public
from dpjax.privacy.clipping import ClipRule, global_norm

PyTree = Any
BatchLoss = Callable[[PyTree, dict], jax.Array]    # (params, {image [n,...], label [n]}) -> mean
ExampleLoss = Callable[[PyTree, dict], jax.Array]  # (params, {image [H,W,C], label []}) -> scalar


class _Static:
  """Wraps a function or clip rule as a static jit argument: equal rules (frozen dataclasses) share
  one compilation; unhashable ones (GroupClip holds a dict) and functions compare by identity."""
  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def _key(self):
    try:
      return (type(self.obj), hash(self.obj), self.obj)
    except TypeError:
      return (type(self.obj), id(self.obj), None)

  def __hash__(self):
    return hash(self._key()[:2])

  def __eq__(self, other):
    if not isinstance(other, _Static):
      return False
    if other.obj is self.obj:
      return True
    mine, theirs = self._key(), other._key()
    return mine[2] is not None and theirs[2] is not None and bool(mine == theirs)


def mean_loss(example_loss: ExampleLoss) -> BatchLoss:
  """batch_loss(params, batch) = mean over the batch's leading axis of example_loss. Build it once
  and reuse it: `hvp` and `hutchinson_trace` compile once per batch_loss object."""
  def batch_loss(params, batch):
    return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0))(params, batch))
  return batch_loss


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Σ over leaves of ⟨a, b⟩, in float32."""
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _hvp(batch_loss: BatchLoss, params: PyTree, batch: dict, v: PyTree) -> PyTree:
  v = jax.tree_util.tree_map(lambda p, x: x.astype(p.dtype), params, v)
  return jax.jvp(lambda p: jax.grad(batch_loss)(p, batch), (params,), (v,))[1]


_hvp_jit = jax.jit(lambda loss, params, batch, v: _hvp(loss.obj, params, batch, v),
                   static_argnums=0)


def hvp(batch_loss: BatchLoss, params: PyTree, batch: PublicBatch, v: PyTree) -> PyTree:
  """Hessian-vector product H v of the mean loss on `batch`, forward-over-reverse.

  Args:
    batch_loss: (params, {image [n,H,W,C], label [n]}) -> scalar mean loss (see `mean_loss`).
    params: pytree of parameters.
    batch: a PublicBatch of n examples (anything else: TypeError).
    v: pytree like params.

  Returns:
    H v, a pytree like params, H = ∇²_params batch_loss. Privacy: reads only public data.
  """
  return _hvp_jit(_Static(batch_loss), params, require_public(batch, "hvp"), v)


class TraceEstimate(NamedTuple):
  """Hutchinson estimate of tr(H): mean of vᵀHv over probes, its standard error, probe count."""
  mean: float
  stderr: float
  num_probes: int


def _rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.rademacher(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _hutchinson_samples(batch_loss, params, batch, key, num_probes) -> jax.Array:
  """[num_probes] samples vᵀHv, one Rademacher v per probe (lax.map: memory of one HVP)."""
  def one(k):
    v = _rademacher_like(k, params)
    return _vdot(v, _hvp(batch_loss, params, batch, v))
  return jax.lax.map(one, jax.random.split(key, num_probes))


_hutchinson_jit = jax.jit(
    lambda loss, params, batch, key, m: _hutchinson_samples(loss.obj, params, batch, key, m),
    static_argnums=(0, 4))


def _summarize_trace(samples: jax.Array) -> TraceEstimate:
  s = np.asarray(samples, np.float64)
  return TraceEstimate(float(s.mean()), float(s.std(ddof=1) / math.sqrt(s.size)), int(s.size))


def _check_probes(num_probes: int) -> int:
  if not isinstance(num_probes, int) or num_probes < 2:
    raise ValueError(f"num_probes must be an int >= 2 (the standard error needs two), got "
                     f"{num_probes!r}.")
  return num_probes


def hutchinson_trace(batch_loss: BatchLoss, params: PyTree, batch: PublicBatch, key: jax.Array,
                     num_probes: int) -> TraceEstimate:
  """tr(H) of the mean loss on `batch` by Hutchinson's estimator with Rademacher probes.

  tr(H) ≈ (1/m) Σ_k v_kᵀ H v_k, v_k ∈ {±1}^d; unbiased; stderr = sample std (ddof 1) / √m.
  Costs m HVPs, run one after another (memory of one). Privacy: reads only public data.
  """
  samples = _hutchinson_jit(_Static(batch_loss), params,
                            require_public(batch, "hutchinson_trace"), key,
                            _check_probes(num_probes))
  return _summarize_trace(samples)


class CurvatureTerms(NamedTuple):
  """The second-order model's terms, estimated on one public batch (see `curvature_terms`).

  grad_norm_sq: ‖G‖², G the mean (population) gradient.
  gHg: GᵀHG.
  trace_h, trace_h_stderr: tr(H) (Hutchinson) and its standard error.
  trace_h_sigma: tr(HΣ), Σ the per-example gradient covariance.
  clip_factor: c, mean over examples of C_i = ‖clip(g_i)‖/‖g_i‖ under the clip rule (examples
    with g_i = 0 left out: they add nothing; nan if all are 0, which the formulas treat as c ≤ 0).
  mean_grad_norm: mean per-example ‖g_i‖.
  sensitivity: R = clip_rule.sensitivity.
  num_examples: size of the public batch the terms were estimated on (not the B of the formulas).
  """
  grad_norm_sq: float
  gHg: float
  trace_h: float
  trace_h_stderr: float
  trace_h_sigma: float
  clip_factor: float
  mean_grad_norm: float
  sensitivity: float
  num_examples: int


def _terms(loss, rule, params, batch, key, num_probes, num_quad, unbiased):
  """Device part of `curvature_terms`: per-example gradients, clip factors and HVPs."""
  example_loss, batch_loss = loss.obj, mean_loss(loss.obj)
  grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)  # leaves [n, ...]
  n = batch["label"].shape[0]
  norms = jax.vmap(global_norm)(grads)
  clipped_norms = jax.vmap(lambda g: global_norm(rule.obj.clip(g)[0]))(grads)
  nonzero = norms > 0  # a zero gradient adds nothing whatever its factor: left out of the mean
  factors = jnp.where(nonzero, clipped_norms / jnp.where(nonzero, norms, 1.0), 0.0)
  mean_g = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
  q_mean = _vdot(mean_g, _hvp(batch_loss, params, batch, mean_g))          # ĜᵀHĜ
  quad = jax.lax.map(lambda g: _vdot(g, _hvp(batch_loss, params, batch, g)),
                     jax.tree_util.tree_map(lambda g: g[:num_quad], grads))  # g_iᵀHg_i [s]
  sq_mean, quad_mean = jnp.mean(norms ** 2), jnp.mean(quad)
  if unbiased:  # U-statistics over pairs i ≠ j: (n·ĜᵀHĜ − mean g_iᵀHg_i)/(n − 1)
    gsq, ghg = (n * _vdot(mean_g, mean_g) - sq_mean) / (n - 1), (n * q_mean - quad_mean) / (n - 1)
  else:
    gsq, ghg = _vdot(mean_g, mean_g), q_mean
  return dict(grad_norm_sq=gsq, gHg=ghg, trace_h_sigma=quad_mean - ghg,
              clip_factor=jnp.sum(factors) / jnp.sum(nonzero), mean_grad_norm=jnp.mean(norms),
              trace_samples=_hutchinson_samples(batch_loss, params, batch, key, num_probes))


_terms_jit = jax.jit(_terms, static_argnums=(0, 1, 5, 6, 7))


def curvature_terms(example_loss: ExampleLoss, params: PyTree, batch: PublicBatch,
                    clip_rule: ClipRule, key: jax.Array, num_probes: int = 16,
                    max_quad_examples: int | None = 64, estimator: str = "unbiased"
                    ) -> CurvatureTerms:
  """Estimates the `CurvatureTerms` on a public batch of n examples.

  Args:
    example_loss: (params, {image [H,W,C], label []}) -> scalar, for ONE example, as
      `dpjax.train.step.make_example_loss`; H is the Hessian of its mean over the batch.
    params: pytree of parameters (all of them are differentiated).
    batch: a PublicBatch of n >= 2 examples (anything else: TypeError).
    clip_rule: the ClipRule of the private steps; gives C_i and R.
    key: PRNG key of the Hutchinson probes.
    num_probes: m >= 2 Hutchinson probes for tr(H).
    max_quad_examples: g_iᵀHg_i (for tr(HΣ)) is computed on the first s = min(n, this) examples
      (None: all); the batch should be a random sample, so any s of them are too.
    estimator: "unbiased" (default): ‖G‖² and GᵀHG by U-statistics over pairs i ≠ j,
      (n·ĜᵀHĜ − mean_i g_iᵀHg_i)/(n − 1), and tr(HΣ) = mean_i g_iᵀHg_i − GᵀHG, i.e. with the
      n/(n − 1) covariance. "plugin": ĜᵀHĜ and ‖Ĝ‖² of the batch mean Ĝ, which overestimate by
      tr(HΣ)/n and tr(Σ)/n, and tr(HΣ) with the 1/n covariance. The U-statistic uses all pairs, so
      it has lower variance than the two-halves estimate Ĝ₁ᵀHĜ₂. Both treat the batch Hessian H as
      fixed: each example's own Hessian term in H correlates with its g_i, an O(1/n) bias. The
      unbiased ‖G‖² and GᵀHG can come out < 0 when noise swamps the signal.

  Returns:
    CurvatureTerms of Python floats. Cost: one per-example gradient pass ([n, d] memory), then
    1 + s + m batch HVPs one after another. Compiles once per example_loss object, equal clip
    rule (GroupClip: same object), num_probes, s and estimator.

  Privacy: reads only the public batch; the outputs are functions of public data and of params.
  """
  data = require_public(batch, "curvature_terms")
  n = len(batch)
  if n < 2:
    raise ValueError(f"curvature_terms needs a batch of at least 2 examples, got {n}.")
  if estimator not in ("unbiased", "plugin"):
    raise ValueError(f"estimator must be 'unbiased' or 'plugin', got {estimator!r}.")
  s = n if max_quad_examples is None else min(n, int(max_quad_examples))
  if s < 1:
    raise ValueError(f"max_quad_examples must be >= 1 or None, got {max_quad_examples!r}.")
  out = jax.device_get(_terms_jit(_Static(example_loss), _Static(clip_rule), params, data,
                                  key, _check_probes(num_probes), s, estimator == "unbiased"))
  trace = _summarize_trace(out.pop("trace_samples"))
  return CurvatureTerms(trace_h=trace.mean, trace_h_stderr=trace.stderr,
                        sensitivity=float(clip_rule.sensitivity), num_examples=n,
                        **{k: float(v) for k, v in out.items()})


# ------------------------------------------------------------------------------------------------
# A first-order model of Adam's step (ours): the share of a non-private step's progress a DP
# step keeps when each coordinate is divided by the root of its mean square.


def _adam_progress(loss, rule, params, batch, batch_size, noise_std):
  """Device part of `adam_dp_efficiency`: (P_dp, P_sgd), the progress sums."""
  grads = jax.vmap(jax.grad(loss.obj), in_axes=(None, 0))(params, batch)  # leaves [n, ...]
  clipped = jax.vmap(lambda g: rule.obj.clip(g)[0])(grads)
  n = batch["label"].shape[0]
  half = n // 2

  def moments(g):  # two half means (for unbiased products), the mean, the per-example variance
    return (jnp.mean(g[:half], 0), jnp.mean(g[half:2 * half], 0), jnp.mean(g, 0),
            jnp.var(g, 0, ddof=1))

  def progress(numerator, mean, variance, extra):
    signal = jnp.maximum(mean ** 2 - variance / n, 0.0)  # unbiased μ², floored at 0
    second_moment = signal + variance / batch_size + extra
    return jnp.sum(jnp.where(second_moment > 0, numerator / jnp.sqrt(
        jnp.where(second_moment > 0, second_moment, 1.0)), 0.0))

  p_dp = p_sgd = 0.0
  for g, c in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(clipped)):
    a, b, m, v = moments(g.astype(jnp.float32))
    ac, bc, mc, vc = moments(c.astype(jnp.float32))
    p_sgd += progress(a * b, m, v, 0.0)
    p_dp += progress((a * bc + b * ac) / 2, mc, vc, noise_std ** 2)
  return p_dp, p_sgd


_adam_progress_jit = jax.jit(_adam_progress, static_argnums=(0, 1))


def adam_dp_efficiency(example_loss: ExampleLoss, params: PyTree, batch: PublicBatch,
                       clip_rule: ClipRule, batch_size: float, noise_multiplier: float) -> float:
  """r_Adam in [0, 1]: the share of a non-private Adam step's progress a DP Adam step keeps.

  [INFERRED, ours.] Adam moves coordinate j by about lr·E[g_j]/sqrt(E[g_j²]) (its first moment
  averages g_j, its second moment tracks E[g_j²]), so a step's first-order progress on the loss is
  P = Σ_j G_j·E[g_j]/sqrt(E[g_j²]). With G the mean gradient, Gc the mean clipped gradient,
  V and Vc the per-example variances and the DP noise's std σR/B per coordinate:

      P_sgd = Σ_j G_j² / sqrt(G_j² + V_j/B)
      P_dp  = Σ_j G_j·Gc_j / sqrt(Gc_j² + Vc_j/B + (σR/B)²),   r_Adam = P_dp / P_sgd.

  Unlike the second-order SGD model (`dp_efficiency`), the noise counts in every coordinate,
  whatever the curvature there: Adam scales a coordinate whose signal is small next to the noise
  up to a full-size step of noise. G_j·Gc_j and G_j² are estimated without bias from the two
  halves of the batch, Gc_j² and G_j² under the roots as the square of the mean less V/n.

  Args: as `curvature_terms` (a PublicBatch of n >= 4 examples; anything else: TypeError), and
    batch_size B and noise_multiplier σ of the private steps. NaN when P_sgd <= 0 (the public
    batch shows no progress to share).
  Privacy: reads only the public batch.
  """
  data = require_public(batch, "adam_dp_efficiency")
  if len(batch) < 4:
    raise ValueError(f"adam_dp_efficiency needs a batch of at least 4 examples, got {len(batch)}.")
  noise_std = noise_multiplier * float(clip_rule.sensitivity) / batch_size
  p_dp, p_sgd = (float(x) for x in jax.device_get(_adam_progress_jit(
      _Static(example_loss), _Static(clip_rule), params, data, float(batch_size), noise_std)))
  if not p_sgd > 0:
    return math.nan
  return min(max(p_dp / p_sgd, 0.0), 1.0)


# ------------------------------------------------------------------------------------------------
# The second-order model (papers.md §2.2, §2.4), from the terms. Pure float functions.


def _noise_term(terms: CurvatureTerms, batch_size: float, noise_multiplier: float) -> float:
  """σ²R² tr(H)/(B c²), the per-sample decelerator (0 at σ = 0, inf at c ≤ 0 < σ)."""
  if noise_multiplier == 0:
    return 0.0
  if not terms.clip_factor > 0:
    return math.inf
  return (noise_multiplier * terms.sensitivity) ** 2 * terms.trace_h / (
      batch_size * terms.clip_factor ** 2)


def decelerator(terms: CurvatureTerms, batch_size: float, noise_multiplier: float) -> float:
  """σ² R² tr(H) / (B c²): the per-sample DP term of the improvement's denominator.

  0 at σ = 0; inf at c ≤ 0 < σ; negative only if the tr(H) estimate is (check trace_h_stderr).
  """
  return _noise_term(terms, batch_size, noise_multiplier)


def _improvement(terms: CurvatureTerms, denominator: float) -> float:
  numerator = max(terms.grad_norm_sq, 0.0) ** 2
  if numerator == 0:
    return 0.0
  return math.inf if denominator <= 0 else numerator / (2 * denominator)


def loss_improvement_sgd(terms: CurvatureTerms, batch_size: float) -> float:
  """‖G‖⁴ / (2 [GᵀHG + tr(HΣ)/B]): loss decrease per SGD iteration at the best learning rate.

  inf if the bracket is ≤ 0 (no minimum along the step); 0 if ‖G‖² ≤ 0.
  """
  return _improvement(terms, terms.gHg + terms.trace_h_sigma / batch_size)


def loss_improvement_dp(terms: CurvatureTerms, batch_size: float, noise_multiplier: float
                        ) -> float:
  """‖G‖⁴ / (2 [GᵀHG + tr(HΣ)/B + σ²R² tr(H)/(B² c²)]): the same for one DP-SGD iteration.

  Equals `loss_improvement_sgd` at σ = 0; 0 at c ≤ 0 < σ; inf / 0 as for SGD.
  """
  noise = _noise_term(terms, batch_size, noise_multiplier) / batch_size
  return _improvement(terms, terms.gHg + terms.trace_h_sigma / batch_size + noise)


def dp_efficiency(terms: CurvatureTerms, batch_size: float, noise_multiplier: float) -> float:
  """r = loss_improvement_dp / loss_improvement_sgd at the same batch size B, in [0, 1]:

      r = [GᵀHG + tr(HΣ)/B] / [GᵀHG + tr(HΣ)/B + σ²R² tr(H)/(B² c²)]

  the share of a non-private step's progress a DP step keeps (‖G‖⁴ cancels). 1 at σ = 0, 0 at
  c ≤ 0 < σ; NaN (no evidence) when the bracket or the tr(H) estimate is ≤ 0.
  """
  bracket = terms.gHg + terms.trace_h_sigma / batch_size
  if noise_multiplier == 0:
    return 1.0
  if bracket <= 0 or terms.trace_h <= 0:
    return math.nan
  noise = _noise_term(terms, batch_size, noise_multiplier) / batch_size
  return 0.0 if math.isinf(noise) else bracket / (bracket + noise)


def optimal_batch_size(terms: CurvatureTerms, noise_multiplier: float) -> float:
  """B_op = (σR/c) · sqrt(tr(H) / GᵀHG), minimising the per-sample DP denominator
  B·GᵀHG + tr(HΣ) + σ²R² tr(H)/(B c²) at fixed σ.

  0 when σ = 0 or tr(H) ≤ 0 (no decelerator to amortise: smaller is better per sample);
  otherwise inf when c ≤ 0 or GᵀHG ≤ 0 (larger is always better per sample).
  """
  if noise_multiplier == 0 or terms.trace_h <= 0:
    return 0.0
  if not (terms.clip_factor > 0 and terms.gHg > 0):
    return math.inf
  return (noise_multiplier * terms.sensitivity / terms.clip_factor) * math.sqrt(
      terms.trace_h / terms.gHg)


def optimal_alpha(terms: CurvatureTerms, public_batch_size: float, private_batch_size: float,
                  noise_multiplier: float) -> float:
  """α* in [0, 1] for g = α·g_pub + (1 − α)·g̃_priv/c, the public weight of least loss.

  [INFERRED derivation, papers.md §2.4; Bu et al.'s own α* is not verified.] Take both terms
  unbiased for G with independent noise, and the same per-example covariance Σ on public and
  private data. The H-weighted variances are V_pub = tr(HΣ)/B_pub and
  V_priv = tr(HΣ)/B_priv + σ²R² tr(H)/(B_priv² c²), so the improvement's denominator is
  GᵀHG + α² V_pub + (1 − α)² V_priv, least at α* = V_priv / (V_pub + V_priv). A biased public
  gradient (little public data, distribution shift) would lower the true α*; that is not modelled.

  Negative variance estimates are floored at 0. Ties (both 0) and V_priv = inf (c ≤ 0 < σ) give
  1: public steps spend no privacy budget. α* → 1 as σ → ∞.
  """
  v_pub = max(terms.trace_h_sigma / public_batch_size, 0.0)
  v_priv = max(terms.trace_h_sigma / private_batch_size
               + _noise_term(terms, private_batch_size, noise_multiplier) / private_batch_size, 0.0)
  if math.isinf(v_priv) or v_pub + v_priv == 0:
    return 1.0
  return min(max(v_priv / (v_pub + v_priv), 0.0), 1.0)
