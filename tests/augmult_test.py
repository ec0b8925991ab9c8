"""Augmentation multiplicity on both per-example paths: the losses of `dpjax.train.step` with
`dpjax.data.views.Views`, and ghost clipping's merge of each example's views
(`dpjax.privacy.ghost.terms.merge_views`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.data import views as views_lib
from dpjax.models import wrn
from dpjax.privacy import clipping, ghost
from dpjax.train import step as step_lib
from tests import toy_models
from tests.ghost_test import MODELS


def with_views(batch, step=3):
  """The batch with the per-row fields a loss with views reads: ids 100, 101, ... and the step."""
  n = len(batch["label"])
  return dict(batch, id=jnp.arange(100, 100 + n, dtype=jnp.int32),
              step=jnp.full(n, step, jnp.int32))


def test_the_vmap_path_clips_the_mean_of_the_view_gradients():
  """Against a loop over examples: each real example's gradient is the mean of its K views'
  gradients (each of the plain loss on one view), clipped to C once, then summed."""
  model, k, rule = toy_models.MODELS["conv"], 3, clipping.FlatClip(0.5)
  params = toy_models.init(model)
  views = views_lib.Views("crop_flip", k, seed=4)
  batch, mask = with_views(toy_models.batch(6, seed=1, scale=3.0)), np.arange(6) < 5
  accumulate = step_lib.make_accumulate(step_lib.make_example_loss(model, views=views), rule)
  got = accumulate(step_lib.make_zero_sum(rule)(params), params, None, batch, mask,
                   np.bool_(True))
  plain = jax.jit(jax.grad(step_lib.make_example_loss(model)))
  want, norms = jax.tree_util.tree_map(np.zeros_like, params), []
  for i in range(5):
    images = views.of_example(batch["image"][i], batch["id"][i], batch["step"][i])
    grads = [plain(params, dict(image=image, label=batch["label"][i])) for image in images]
    mean = jax.tree_util.tree_map(lambda *g: sum(g) / k, *grads)
    norms.append(float(clipping.global_norm(mean)))
    factor = min(1.0, rule.clip_norm / norms[-1])
    want = jax.tree_util.tree_map(lambda w, g: w + factor * np.asarray(g), want, mean)
  assert got.sensitivity == rule.sensitivity and float(got.stats.num_examples) == 5
  assert float(got.stats.num_clipped) == sum(n > rule.clip_norm for n in norms) > 0
  np.testing.assert_allclose(got.stats.norm_max, max(norms), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got.grad_sum), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,k,rule", [
    ("conv", 4, clipping.FlatClip(0.3)), ("conv", 2, "per_layer"),
    ("attention", 3, clipping.NormalizedClip(0.3)), ("embed", 2, clipping.FlatClip(0.3)),
    ("vit", 2, clipping.FlatClip(0.3)), ("vit_scan", 2, clipping.AutomaticClip(0.3, 0.01)),
    ("wrn", 2, clipping.FlatClip(0.3)), ("conv1d", 2, clipping.FlatClip(0.3))])
def test_ghost_with_views_equals_vmap_with_views(name, k, rule):
  """The trainer's accumulate step on both paths: ghost merges each example's K views into its
  terms (kernels over K·T positions, the Lookup of an embedding, summed biases and norm scales,
  the ViT's token embedding, WSConv's factored terms, scanned stacks; the vmap fallback runs the
  loss with views itself) and gets the vmap path's norms (ClipStats) and clipped sum. rtol as in
  ghost_test: the factor comes from an upper bound that covers rounding."""
  model = MODELS[name]()
  params = toy_models.init(model)
  if rule == "per_layer":
    rule = clipping.per_layer_clip(params, 2.0)
  views = views_lib.Views("crop_flip", k, seed=0)
  batch, mask = with_views(toy_models.batch(8, seed=4, scale=3.0)), np.arange(8) < 7
  example_loss = step_lib.make_example_loss(model, views=views)
  fast = step_lib.make_accumulate(example_loss, rule, views=k,
                                  batch_losses=step_lib.make_batch_losses(model, views=views))
  slow = step_lib.make_accumulate(example_loss, rule)
  zero_sum = step_lib.make_zero_sum(rule)
  got, want = (jax.device_get(f(zero_sum(params), params, None, batch, mask, np.bool_(True)))
               for f in (fast, slow))
  for a, b in zip(jax.tree_util.tree_leaves(got.grad_sum), jax.tree_util.tree_leaves(want.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
  for a, b in zip(got.stats, want.stats):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert got.sensitivity == want.sensitivity == rule.sensitivity


def test_a_term_without_merge_views_is_instantiated_and_its_views_added(monkeypatch):
  """A module's own term without a merge_views method (here the WRN's WSConv term, with the
  method taken away) still gives the vmap path's norms and clipped sum."""
  monkeypatch.delattr(wrn.StandardizedConvTerm, "merge_views")
  test_ghost_with_views_equals_vmap_with_views("wrn", 2, clipping.FlatClip(0.3))


def _contributions(path, model, dtype, views, batch, rule):
  """Each example's contribution alone (one-hot masks) to the sum of the `path` clipped sum."""
  n, k = len(batch["label"]), 1 if views is None else views.count
  if path == "ghost":
    losses = step_lib.make_batch_losses(model, dtype, views=views)
    clip = lambda one_hot: ghost.clipped_grad_sum(losses, params, batch, one_hot, rule, views=k)
  else:
    loss = step_lib.make_example_loss(model, dtype, views=views)
    clip = lambda one_hot: clipping.clipped_grad_sum(loss, params, batch, one_hot, rule,
                                                     grad_dtype=step_lib.grad_dtype(dtype))
  params = toy_models.init(model)
  alone = jax.jit(jax.vmap(lambda one_hot: clip(one_hot).grad_sum))(jnp.eye(n))
  return jax.vmap(clipping.global_norm)(alone)


@pytest.mark.parametrize("path", ["vmap", "ghost"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("rule", [clipping.FlatClip(0.2), clipping.NormalizedClip(0.2)],
                         ids=["flat", "normalized"])
def test_each_examples_contribution_stays_within_c_whatever_k(path, dtype, k, rule):
  """Every example's contribution, alone, has norm ≤ C (the vmap path: up to float32 rounding
  of the factor, as clipping_test allows), scaled down rather than vanished."""
  model = toy_models.MODELS["conv"]
  batch = with_views(toy_models.batch(8, seed=5, scale=20.0))
  norms = _contributions(path, model, dtype, views_lib.Views("crop_flip", k, seed=1), batch,
                         rule)
  slack = 1.0 if path == "ghost" else 1 + 1e-6
  assert float(jnp.max(norms)) <= rule.sensitivity * slack
  assert float(jnp.min(norms)) > 0.5 * rule.sensitivity


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_without_views_the_id_and_step_fields_change_nothing(method):
  """augment 'none' and K = 1 (no Views): the losses read the image as it is, and the rows' id
  and step fields, which the batches now carry, leave the sums and the public gradient bit for
  bit what they are without them."""
  model, rule = toy_models.MODELS["conv"], clipping.FlatClip(0.3)
  params = toy_models.init(model)
  assert views_lib.make_views("none", 1, 0) is None
  loss = step_lib.make_example_loss(model)
  accumulate = step_lib.make_accumulate(
      loss, rule, batch_losses=step_lib.make_batch_losses(model) if method == "ghost" else None)
  public_grad, zero_sum = step_lib.make_public_grad(loss), step_lib.make_zero_sum(rule)
  plain = toy_models.batch(8, seed=2, scale=3.0)
  found = [jax.device_get((accumulate(zero_sum(params), params, None, b, np.arange(8) < 7,
                                      np.bool_(True)), public_grad(params, b)))
           for b in (plain, with_views(plain))]
  for a, b in zip(*(jax.tree_util.tree_leaves(f) for f in found)):
    np.testing.assert_array_equal(a, b)


def _view_major_losses(model, views):
  """A loss that runs its views view-major (row j·m + i: view j of example i), against the
  example-major order ghost reads: each example's loss is still its own, but ghost would merge
  rows of different examples."""
  def losses(params, batch, ghost_variables=None):
    m = len(batch["label"])
    images = views.of_batch(batch["image"], batch["id"], batch["step"])
    images = images.reshape(m, views.count, *images.shape[1:]).swapaxes(0, 1)
    found = ghost.apply_model(model, params, images.reshape(-1, *images.shape[2:]),
                              ghost_variables)
    logits, mutated = found if ghost_variables is not None else (found, None)
    per_view = step_lib.cross_entropy(logits, jnp.tile(batch["label"], views.count))
    mean = jnp.mean(per_view.reshape(views.count, m), axis=0)
    return mean if ghost_variables is None else (mean, mutated)
  return losses


def test_the_trainers_check_passes_with_views_and_refuses_views_ghost_would_mix():
  model = toy_models.MODELS["conv"]
  params, views = toy_models.init(model), views_lib.Views("crop_flip", 2, seed=0)
  check = lambda losses, k: step_lib.check_ghost_batch_losses(
      losses, params, toy_models.IMAGE_SHAPE, 3, lambda x: x / 255.0, views=k)
  check(step_lib.make_batch_losses(model, views=views), 2)
  with pytest.raises(ghost.ExamplesMixedError, match="gradient norms"):
    check(_view_major_losses(model, views), 2)
  with pytest.raises(ghost.GhostUnsupportedError, match="8 rows .* should give 4"):
    check(step_lib.make_batch_losses(model, views=views), 1)
