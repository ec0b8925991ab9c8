"""Tests for dpjax.privacy.clipping: the fast path against a Python loop, and the sensitivity bound."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import pytrees
from dpjax.privacy import clip_stats, clipping
from tests import toy_models

RULES = {
    "flat": lambda p: clipping.FlatClip(0.5),
    "automatic": lambda p: clipping.AutomaticClip(0.5, 0.01),
    "normalized": lambda p: clipping.NormalizedClip(0.5),
    "per_layer": lambda p: clipping.per_layer_clip(p, 0.5),
}


def naive_clipped_sum(loss, params, examples, mask, rule):
  """The obviously-correct reference: one example at a time, clipped by hand, summed in Python."""
  total = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float64), params)
  grad = jax.jit(jax.grad(loss))
  for i in range(len(mask)):
    if not mask[i]:
      continue
    example = jax.tree_util.tree_map(lambda x: x[i], examples)
    g = grad(params, example)
    g = reference_clip(g, rule)
    total = jax.tree_util.tree_map(lambda t, x: t + np.asarray(x, np.float64), total, g)
  return total


def reference_clip(g, rule):
  """Clip rules written from their definitions, leaf by leaf in NumPy."""
  flat = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(g)]
  norm = math.sqrt(sum(float(np.sum(x * x)) for x in flat))
  if isinstance(rule, clipping.FlatClip):
    f = min(1.0, rule.clip_norm / norm) if norm > 0 else 1.0
  elif isinstance(rule, clipping.AutomaticClip):
    f = rule.clip_norm / (norm + rule.stability)
  elif isinstance(rule, clipping.NormalizedClip):
    f = rule.clip_norm / norm if norm > 0 else 0.0
  else:  # GroupClip: clip each layer's block separately
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(g)[0]:
      names = pytrees.path_to_names(path)
      out.setdefault(rule.group_of(names), []).append((names, np.asarray(x, np.float64)))
    scaled = {}
    for group, members in out.items():
      n = math.sqrt(sum(float(np.sum(x * x)) for _, x in members))
      c = rule.clip_norms[group]
      for names, x in members:
        scaled[names] = x * (min(1.0, c / n) if n > 0 else 1.0)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: scaled[pytrees.path_to_names(p)], g)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64) * f, g)


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("model_name", sorted(toy_models.MODELS))
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_fast_path_equals_python_loop(model_name, rule_name):
  model = toy_models.MODELS[model_name]
  params = toy_models.init(model)
  loss = toy_models.per_example_loss(model)
  examples = toy_models.batch(12, seed=1, scale=3.0)
  mask = np.array([1] * 9 + [0] * 3, bool)  # three padded rows
  rule = RULES[rule_name](params)
  fast = jax.jit(lambda p, e, m: clipping.clipped_grad_sum(
      loss, p, e, m, rule, microbatch_size=4))(params, examples, mask)
  assert_trees_close(fast.grad_sum, naive_clipped_sum(loss, params, examples, mask, rule))
  assert float(fast.stats.num_examples) == 9


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, 1e4, 1e8])
def test_one_example_moves_the_sum_by_at_most_the_sensitivity(rule_name, scale):
  """The privacy claim itself: removing any one example changes the sum by <= sensitivity."""
  model = toy_models.MODELS["conv"]
  params = toy_models.init(model, seed=3)
  loss = toy_models.per_example_loss(model)
  rng = np.random.default_rng(7)
  examples = toy_models.batch(8, seed=int(rng.integers(1000)), scale=scale)
  rule = RULES[rule_name](params)
  fn = jax.jit(lambda m: clipping.clipped_grad_sum(loss, params, examples, m, rule).grad_sum)
  full = fn(np.ones(8, bool))
  for i in range(8):
    without = np.ones(8, bool)
    without[i] = False
    diff = jax.tree_util.tree_map(lambda a, b: a - b, full, fn(without))
    assert float(clipping.global_norm(diff)) <= rule.sensitivity * (1 + 1e-5)


def test_contributions_bounded_for_random_gradients():
  """Property test straight on the rules: random pytrees of every scale, including zero."""
  rng = np.random.default_rng(0)
  tree = {"a": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)}, "b": {"kernel": np.zeros(5)}}
  rules = [r(tree) for r in RULES.values()]
  rules.append(clipping.GroupClip({"a": 0.3, "b": 2.0}, group_of=lambda p: p[0]))
  for trial in range(200):
    scale = 10.0 ** rng.uniform(-8, 8) if trial % 10 else 0.0
    g = jax.tree_util.tree_map(lambda x: scale * rng.standard_normal(x.shape), tree)
    for rule in rules:
      clipped, _, _ = rule.clip(g)
      assert float(clipping.global_norm(clipped)) <= rule.sensitivity * (1 + 1e-6)


def test_every_rules_factors_keep_factor_times_norm_within_each_groups_bound():
  """The `ClipRule` contract that ghost clipping relies on when it feeds the factors an upper
  bound U on a group's norm: factor_g(x)·x ≤ C_g for every x ≥ 0 (zero, tiny, huge, inf), with
  Σ_g C_g² = sensitivity², for rules that scale down (flat, per-layer) and up (automatic,
  normalized); and the clip flag marks x > C_g."""
  tree = {"a": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)}, "b": {"kernel": np.zeros(5)}}
  x = jnp.concatenate([jnp.zeros(1), jnp.logspace(-8, 8, 161), jnp.full(1, jnp.inf)])
  rules = [r(tree) for r in RULES.values()]
  rules.append(clipping.GroupClip({"a": 0.3, "b": 2.0}, group_of=lambda p: p[0]))
  for rule in rules:
    names = set(jax.tree_util.tree_leaves(rule.groups(tree)))
    bounds = (rule.clip_norms if isinstance(rule, clipping.GroupClip)
              else {name: rule.sensitivity for name in names})
    assert math.isclose(math.sqrt(sum(c * c for c in bounds.values())), rule.sensitivity)
    for name in names:  # this group's norm x, the others' zero
      factors, flags = rule.factors({other: x if other == name else jnp.zeros_like(x)
                                     for other in names})
      scaled = np.asarray(jnp.where(jnp.isinf(x), 0.0, factors[name] * x))
      assert np.all(scaled <= bounds[name] * (1 + 1e-6)), (rule, name)
      assert np.all(np.asarray(factors[name])[np.isinf(x)] == 0.0)
      np.testing.assert_array_equal(flags, np.asarray(x > bounds[name], np.float32))


def test_a_rule_must_define_its_groups_and_factors():
  """A rule that does not say how it scales each group (e.g. one that clips element by element)
  cannot be made: both per-example paths use only `groups` and `factors`."""
  class ElementClip(clipping.ClipRule):
    sensitivity = 1.0
  with pytest.raises(TypeError, match="abstract"):
    ElementClip()


def test_sensitivity_of_group_and_per_layer_rules():
  rule = clipping.GroupClip({"a": 3.0, "b": 4.0}, group_of=lambda p: p[0])
  assert rule.sensitivity == pytest.approx(5.0)
  params = toy_models.init(toy_models.MODELS["dense"])
  assert clipping.per_layer_clip(params, 2.0).sensitivity == pytest.approx(2.0)
  assert len(clipping.per_layer_clip(params, 2.0).clip_norms) == 2  # Dense_0 and Dense_1


def test_reported_sensitivity_is_the_enforced_bound():
  """Normalized clipping makes every nonzero contribution exactly R: the bound is tight."""
  g = {"w": jnp.array([3.0, 4.0])}
  for rule in [clipping.FlatClip(1.0), clipping.NormalizedClip(1.0)]:
    clipped, norm, was_clipped = rule.clip(g)
    assert float(norm) == pytest.approx(5.0)
    assert float(clipping.global_norm(clipped)) == pytest.approx(rule.sensitivity)
    assert float(was_clipped) == 1.0


def test_padding_with_nan_does_not_leak():
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  loss = toy_models.per_example_loss(model)
  examples = toy_models.batch(4)
  examples["image"] = examples["image"].at[3].set(jnp.nan)
  mask = np.array([1, 1, 1, 0], bool)
  out = clipping.clipped_grad_sum(loss, params, examples, mask, clipping.FlatClip(1.0))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(out.grad_sum))
  assert np.isfinite(float(out.stats.norm_max))


def with_non_finite_examples(examples):
  """The batch with an inf pixel in example 1 and a NaN pixel in example 4."""
  image = examples["image"].at[1, 2, 3, 0].set(jnp.inf).at[4, 0, 0, 0].set(jnp.nan)
  return dict(examples, image=image)


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_an_example_with_an_inf_or_nan_gradient_adds_exactly_zero(rule_name):
  """An inf or NaN input makes that example's gradient non-finite; its presence must not show in
  the sum (which a NaN sum would show): the sum equals the one without it, and the statistics
  stay finite."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  loss = toy_models.per_example_loss(model)
  rule = RULES[rule_name](params)
  examples = with_non_finite_examples(toy_models.batch(6, seed=3, scale=3.0))
  mask = np.array([1, 1, 1, 1, 1, 0], bool)
  clip = jax.jit(lambda m: clipping.clipped_grad_sum(loss, params, examples, m, rule,
                                                     microbatch_size=3))
  out, without = clip(mask), clip(mask & ~np.isin(np.arange(6), [1, 4]))
  for a, b in zip(jax.tree_util.tree_leaves(out.grad_sum),
                  jax.tree_util.tree_leaves(without.grad_sum)):
    np.testing.assert_array_equal(a, b)
  assert all(np.isfinite(float(x)) for x in out.stats)
  assert float(out.stats.num_examples) == 5.0
  assert float(out.stats.num_clipped) >= 2.0  # the two dropped examples count as clipped


def test_one_microbatch_is_traced_once():
  """A batch that is one microbatch (the trainer's accumulate step) is clipped without a scan:
  the scan's body was a second copy of the whole per-example computation, which doubled the
  tracing time of a ViT-B step. Several microbatches scan."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  loss = toy_models.per_example_loss(model)
  examples, mask = toy_models.batch(4), np.ones(4, bool)
  jaxpr = lambda m: str(jax.make_jaxpr(lambda p: clipping.clipped_grad_sum(
      loss, p, examples, mask, clipping.FlatClip(1.0), microbatch_size=m))(params))
  assert "scan" not in jaxpr(4)
  assert "scan" in jaxpr(2)


def test_statistics():
  g = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]])}  # norms 5, 0.5, 50
  rule = clipping.FlatClip(1.0)
  _, norms, clipped = jax.vmap(rule.clip)(g)
  np.testing.assert_allclose(norms, [5.0, 0.5, 50.0], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [1.0, 0.0, 1.0])
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  out = clipping.clipped_grad_sum(toy_models.per_example_loss(model), params,
                                  toy_models.batch(6, scale=100.0), np.ones(6, bool),
                                  clipping.FlatClip(1e-6), microbatch_size=3)
  summary = clip_stats.summarize(out.stats)
  assert float(summary["clip_fraction"]) == 1.0
  assert float(summary["max_grad_norm"]) >= float(summary["mean_grad_norm"]) > 0


def test_frozen_parameters_get_no_per_example_gradient():
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  loss = toy_models.per_example_loss(model)
  trainable = pytrees.trainable_mask(params, lambda path: path[0] == "Dense_1")
  examples, mask = toy_models.batch(6), np.ones(6, bool)
  rule = clipping.FlatClip(1.0)
  run = lambda p: clipping.clipped_grad_sum(loss, p, examples, mask, rule, microbatch_size=3,
                                            trainable=trainable)
  out = run(params)
  assert not np.any(np.asarray(out.grad_sum["Dense_0"]["kernel"]))
  # Reference: the same loss as a function of the trainable layer only.
  head_loss = lambda head, ex: loss({"Dense_0": params["Dense_0"], "Dense_1": head}, ex)
  ref = naive_clipped_sum(head_loss, params["Dense_1"], examples, mask, rule)
  assert_trees_close(out.grad_sum["Dense_1"], ref)
  # No intermediate anywhere in the computation has the per-example frozen-kernel shape.
  frozen_shape = (3,) + params["Dense_0"]["kernel"].shape
  shapes = _all_shapes(jax.make_jaxpr(run)(params).jaxpr)
  assert frozen_shape not in shapes
  assert (3,) + params["Dense_1"]["kernel"].shape in shapes  # the check can see such shapes


def _all_shapes(jaxpr):
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for sub in _sub_jaxprs(eqn.params):
      shapes |= _all_shapes(sub)
  return shapes


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (list, tuple)) else [value]:
      inner = getattr(v, "jaxpr", None)
      if inner is not None:
        yield inner if hasattr(inner, "eqns") else inner.jaxpr
      elif hasattr(v, "eqns"):
        yield v


def test_bad_input_errors():
  for bad in [0.0, -1.0, float("inf"), float("nan")]:
    with pytest.raises(ValueError, match="clip_norm"):
      clipping.FlatClip(bad)
    with pytest.raises(ValueError, match="clip_norm"):
      clipping.AutomaticClip(bad)
  with pytest.raises(ValueError, match="group"):
    clipping.GroupClip({"a": -1.0}, group_of=lambda p: "a")
  with pytest.raises(ValueError, match="Unknown clip rule"):
    clipping.make_clip_rule("elementwise", 1.0)
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  with pytest.raises(ValueError, match="does not split into microbatches"):
    clipping.clipped_grad_sum(toy_models.per_example_loss(model), params, toy_models.batch(10),
                              np.ones(10, bool), clipping.FlatClip(1.0), microbatch_size=4)
  with pytest.raises(ValueError, match="no clip norm"):
    clipping.GroupClip({"x": 1.0}, group_of=lambda p: p[0]).clip(params)


def test_batchnorm_statistics_are_rejected():
  params = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}},
            "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2)}}}
  with pytest.raises(clipping.BatchNormInDPModelError, match="GroupNorm"):
    clipping.clipped_grad_sum(lambda p, e: 0.0, params, {"x": jnp.ones((2, 2))},
                              np.ones(2, bool), clipping.FlatClip(1.0))


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_bfloat16_per_example_gradients_keep_the_sensitivity_bound(rule_name):
  """bf16 per-example grads: norms, scaling and the sum in float32, so no example's contribution
  exceeds the sensitivity (a clip factor rounded to bf16 would exceed it by up to 0.4%)."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  rule = RULES[rule_name](params)
  loss = toy_models.per_example_loss(model)
  examples = toy_models.batch(32, seed=3, scale=20.0)
  one = jax.jit(lambda mask: clipping.clipped_grad_sum(loss, params, examples, mask, rule,
                                                       grad_dtype=jnp.bfloat16).grad_sum)
  for i in range(32):
    contribution = one(jnp.arange(32) == i)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(contribution))
    assert float(clipping.global_norm(contribution)) <= rule.sensitivity * (1 + 1e-6)
  f32 = clipping.clipped_grad_sum(loss, params, examples, jnp.ones(32), rule).grad_sum
  bf16 = clipping.clipped_grad_sum(loss, params, examples, jnp.ones(32), rule,
                                   grad_dtype=jnp.bfloat16).grad_sum
  for a, b in zip(jax.tree_util.tree_leaves(f32), jax.tree_util.tree_leaves(bf16)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * rule.sensitivity)
