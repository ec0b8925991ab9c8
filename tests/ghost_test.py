"""Tests for dpjax.privacy.ghost: ghost norms equal vmap norms; the ghost sum equals the vmap sum."""

import functools
import math
import os
import pathlib
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import finetune, models, pytrees
from dpjax.models import wrn
from dpjax.privacy import clipping, ghost
from dpjax.privacy.ghost import collect, layer_terms
from dpjax.privacy.ghost import norms as ghost_norms
from dpjax.privacy.ghost import patches as ghost_patches
from dpjax.privacy.ghost import terms as ghost_terms
from dpjax.train import step as step_lib
from tests import toy_models


batch_losses_of = toy_models.batch_losses


def vmap_sq_norms(batch_losses, params, batch, trainable=None):
  def one(example):
    single = jax.tree_util.tree_map(lambda x: x[None], example)
    grad = jax.grad(lambda p: batch_losses(p, single)[0])(params)
    if trainable is not None:
      grad = jax.tree_util.tree_map(lambda g, t: g if t else jnp.zeros_like(g), grad, trainable)
    return clipping.global_norm(grad) ** 2
  return jax.vmap(one)(batch)


class StridedConv(nn.Module):
  """Convolutions with stride, explicit padding, dilation (kernel and input), no bias, and a
  GroupNorm."""
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), strides=2, padding=((1, 2), (0, 1)))(x)
    x = nn.GroupNorm(num_groups=3)(jnp.tanh(x))
    x = nn.Conv(4, (2, 2), padding="SAME", kernel_dilation=2, use_bias=False)(x)
    x = nn.Conv(4, (3, 3), strides=(1, 2), padding="VALID")(jnp.tanh(x))
    x = nn.Conv(3, (2, 2), padding=((1, 0), (0, 1)), input_dilation=2)(jnp.tanh(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class TilingConv(nn.Module):
  """Convolutions whose windows tile the input (stride = kernel, no padding), as a ViT's patch
  embedding: ghost takes their patches by a reshape. The first drops a remainder column."""
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(5, (2, 3), strides=(2, 3), padding="VALID")(x)
    x = nn.Conv(4, (2, 2), strides=2, padding=0, use_bias=False)(jnp.tanh(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class Embeddings(nn.Module):
  """Embedding lookups with repeated and negative (wrapping) indices, and a one-row table that
  broadcasts whatever the index."""
  @nn.compact
  def __call__(self, x):
    idx = jnp.clip(jnp.floor(2.0 * x.reshape((x.shape[0], -1))), -7, 6).astype(jnp.int32)
    h = nn.Embed(7, 4)(idx) + nn.Embed(1, 4)(idx[:, :5]).sum(axis=1, keepdims=True)
    return nn.Dense(3)(jnp.tanh(h).mean(axis=1))


class TiedEmbedding(nn.Module):
  """An embedding table also read by `attend` (tied output weights): not one factored term."""
  @nn.compact
  def __call__(self, x):
    idx = jnp.clip(jnp.floor(2.0 * x.reshape((x.shape[0], -1))), 0, 6).astype(jnp.int32)
    embed = nn.Embed(7, 4)
    return embed.attend(jnp.tanh(embed(idx)).mean(axis=1))[:, :3]


class SharedDense(nn.Module):
  """One Dense layer used twice per example: its norm is not a sum of two ghost norms."""
  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    shared = nn.Dense(x.shape[-1])
    return nn.Dense(3)(shared(jnp.tanh(shared(x))))


class Conv1D(nn.Module):
  """A 1-D convolution: not handled by ghost, so its params must go to the vmap fallback."""
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3,), strides=2)(x.reshape((x.shape[0], -1, 1)))
    return nn.Dense(3)(jnp.tanh(x).reshape((x.shape[0], -1)))


def _vit(scan_blocks=False, image_size=8):
  """image_size 12: the 8×8 images resized on the device (input_resize) before the patches."""
  return models.build_model("vit", num_classes=3, variant="Ti", patch_size=4,
                            image_size=image_size, depth=2, width=16, num_heads=2, mlp_dim=32,
                            input_shape=toy_models.IMAGE_SHAPE, scan_blocks=scan_blocks,
                            input_resize=image_size != toy_models.IMAGE_SHAPE[0])


class ScannedDense(nn.Module):
  """Two Dense blocks under nn.scan that stacks the `stacked` collections along its axis (True:
  all of them, as the ViT's blocks do; "params" only: ghost's variables cannot follow)."""
  stacked: Any = True

  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(h.shape[-1])(h)), None
    h = x.reshape((x.shape[0], 4, -1))
    h, _ = nn.scan(Block, variable_axes={self.stacked: 0}, split_rngs={"params": True},
                   length=2)()(h, None)
    return nn.Dense(3)(h.mean(axis=1))


MODELS = {"dense": lambda: toy_models.MODELS["dense"], "conv": lambda: toy_models.MODELS["conv"],
          "attention": lambda: toy_models.MODELS["attention"], "strided_conv": StridedConv,
          "tiling_conv": TilingConv, "embed": Embeddings,
          "shared_dense": SharedDense, "vit": _vit, "conv1d": Conv1D,
          "vit_scan": lambda: _vit(scan_blocks=True),
          "vit_resized": lambda: _vit(image_size=12),
          "wrn": lambda: models.build_model("wrn", num_classes=3, depth=10, width=1,
                                            num_groups=4, input_shape=toy_models.IMAGE_SHAPE),
          # The ResNet-18-like net with GroupNorm: a stage with an identity skip, one projected.
          "resnet": lambda: models.build_model("resnet", num_classes=3, stage_sizes=(1, 1),
                                               width=4, num_groups=2,
                                               input_shape=toy_models.IMAGE_SHAPE)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ghost_norms_equal_vmap_norms(name):
  model = MODELS[name]()
  params = toy_models.init(model)
  losses = batch_losses_of(model)
  batch = toy_models.batch(6, seed=2, scale=2.0)
  expected = jax.jit(lambda p, b: vmap_sq_norms(losses, p, b))(params, batch)
  # The WRN's weight-standardised convs come from WSConv.ghost_grads, the ResNet's layers are
  # all supported ones: no fallback allowed.
  fallback = "error" if name in ("wrn", "resnet") else "vmap"
  got = jax.jit(lambda p, b: ghost.ghost_sq_norms(losses, p, b, fallback=fallback))(params, batch)
  np.testing.assert_allclose(np.sqrt(got), np.sqrt(expected), rtol=1e-5)


def test_leaf_norms_are_reduced_one_stack_per_shape():
  """The leaves' squared norms and rounding bounds are reduced together, one stack per Gram or
  row shape (one fusion each on a GPU), not one reduction per leaf, and equal the per-leaf
  ones."""
  model = MODELS["vit"]()
  params = toy_models.init(model)
  losses = step_lib.make_batch_losses(model, "bfloat16")
  batch = toy_models.batch(8, seed=4, scale=3.0)
  terms = jax.jit(lambda p, b: {path: term for path, (_, term, _) in collect.leaf_terms(
      losses, p, b, None, "vmap").items()})(params, batch)
  entries = collect.leaf_terms(losses, params, batch, None, "vmap")
  rebuilt = lambda found: {path: collect.LeafTerm(module, found[path], stacked)
                           for path, (module, _, stacked) in entries.items()}
  norms = jax.jit(lambda found: ghost_norms.sq_norms_of_terms(rebuilt(found)))(terms)
  gram_shapes, row_shapes = set(), set()  # (m, T) of the kernels' Grams; [m, width] rows
  for path, (_, term, stacked) in entries.items():
    expected = ghost_norms.term_norm_bound(terms[path], stacked)
    for got, want in zip(norms[path], expected):
      np.testing.assert_allclose(got, want, rtol=1e-6)
    if isinstance(term, ghost_terms.Outer):
      gram_shapes.add(term.a.shape[:2])
    elif isinstance(term, ghost_terms.Summed):
      row_shapes.add(term.h.shape)
  assert all(np.all(bound.slack > 0) for bound in norms.values())
  jaxpr = jax.make_jaxpr(lambda found: ghost_norms.sq_norms_of_terms(rebuilt(found)))(terms)
  reductions = [e for e in jaxpr.eqns if e.primitive.name == "reduce_sum"]
  # Per Gram shape the norm and its error bound (each summed over T², in two steps) and the
  # slack; per row shape a norm: 19 here, for 40 leaves.
  assert len(reductions) == 5 * len(gram_shapes) + len(row_shapes) < len(entries) / 2


def test_gram_stacks_are_capped_and_keep_the_norms(monkeypatch):
  """A Gram stack reads at most MAX_GRAMS_PER_STACK distinct Grams (a shared Gram counts once),
  keeps the members' order, and splitting changes no norm."""
  shared, other = object(), [object() for _ in range(5)]
  members = [("q", shared, other[0]), ("k", shared, other[1]), ("v", shared, other[2]),
             ("o", other[3], other[4])]
  monkeypatch.setattr(ghost_norms, "MAX_GRAMS_PER_STACK", 4)
  chunks = ghost_norms.within_gram_cap(members)
  assert [[path for path, _, _ in chunk] for chunk in chunks] == [["q", "k", "v"], ["o"]]
  assert all(len({id(x) for _, a, g in chunk for x in (a, g)}) <= 4 for chunk in chunks)
  monkeypatch.setattr(ghost_norms, "MAX_GRAMS_PER_STACK", 2)
  assert [len(chunk) for chunk in ghost_norms.within_gram_cap(members)] == [1, 1, 1, 1]

  model = MODELS["vit"]()
  params = toy_models.init(model)
  losses = step_lib.make_batch_losses(model, "bfloat16")
  batch = toy_models.batch(8, seed=5, scale=3.0)
  entries = collect.leaf_terms(losses, params, batch, None, "vmap")
  capped = ghost_norms.sq_norms_of_terms(entries)
  monkeypatch.setattr(ghost_norms, "MAX_GRAMS_PER_STACK", 1000)
  whole = ghost_norms.sq_norms_of_terms(entries)
  for path in entries:
    for got, want in zip(capped[path], whole[path]):
      np.testing.assert_allclose(got, want, rtol=1e-6)
  reductions = lambda: sum(e.primitive.name == "reduce_sum" for e in jax.make_jaxpr(
      lambda: ghost_norms.sq_norms_of_terms(entries))().eqns)
  uncapped = reductions()
  monkeypatch.setattr(ghost_norms, "MAX_GRAMS_PER_STACK", 2)
  assert reductions() > uncapped


@pytest.mark.parametrize("module,tiles,shape", [
    (nn.Conv(5, (2, 3), strides=(2, 3), padding="VALID"), True, (2, 4, 2, 18)),
    (nn.Conv(5, (2, 2), strides=2, padding=0), True, (2, 4, 4, 12)),
    (nn.Conv(5, (2, 2), strides=2, padding="SAME"), True, (2, 4, 4, 12)),  # SAME pads nothing
    (nn.Conv(5, (3, 3), strides=2, padding="VALID"), False, (2, 3, 3, 27)),
    (nn.Conv(5, (3, 3), padding="SAME", kernel_dilation=(2, 1)), False, (2, 8, 8, 27)),
    (nn.Conv(5, (3, 2), strides=(2, 1), padding=((2, 0), (1, 3))), False, (2, 4, 11, 18))])
def test_conv_patches_are_gathered_from_the_input(module, tiles, shape):
  """Convs without input dilation get their patches without an (identity-kernel) convolution:
  a reshape when the windows tile the input (a ViT's patch embedding), else strided slices; in
  the order the kernel is laid out in, so patches @ kernel is the conv."""
  assert not ghost_patches.channels_first(module)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  jaxpr = str(jax.make_jaxpr(lambda v: ghost_patches.module_patches(module, v))(x))
  assert "conv_general_dilated" not in jaxpr
  slices = jaxpr.count(" slice[")  # one per kernel position, or at most one crop when tiling
  assert slices <= 1 if tiles else slices == math.prod(module.kernel_size)
  params = module.init(jax.random.PRNGKey(1), x)["params"]
  patches = ghost_patches.module_patches(module, x)
  assert patches.shape == shape
  kernel = params["kernel"].reshape(-1, 5)
  np.testing.assert_allclose(patches @ kernel + params["bias"], module.apply({"params": params}, x),
                             rtol=1e-5, atol=1e-5)


def test_the_weighted_sum_scales_the_factor_that_needs_no_transpose():
  """On a tie (d = p), wᵢ scales the factor with one feature axis: attention's query/key/value
  output grads and the out projection's inputs are per-head arrays that XLA lays out head-major
  (scaling them cost a transpose per layer on an H200); a conv scales its output grads."""
  model = toy_models.MODELS["attention"]
  params = toy_models.init(model)
  terms = collect.leaf_terms(batch_losses_of(model), params, toy_models.batch(2), None,
                                   "error")
  scales = {"/".join(path[-2:]): term.scale_inputs for path, (_, term, _) in terms.items()
            if isinstance(term, ghost_terms.Outer)}
  assert scales == {"query/kernel": True, "key/kernel": True, "value/kernel": True,
                    "out/kernel": False, "Dense_0/kernel": True, "Dense_1/kernel": True}
  conv = toy_models.MODELS["conv"]
  terms = collect.leaf_terms(batch_losses_of(conv), toy_models.init(conv),
                                   toy_models.batch(2), None, "error")
  assert not terms[("Conv_0", "kernel")][1].scale_inputs


def test_per_example_terms_cover_exactly_the_trainable_leaves():
  model = toy_models.MODELS["attention"]
  params = toy_models.init(model)
  paths = {tuple(k.key for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  terms = ghost.per_example_terms(batch_losses_of(model), params, toy_models.batch(2))
  assert set(terms) == paths
  trainable = pytrees.trainable_mask(params, lambda path: "Dense_1" in path)
  terms = ghost.per_example_terms(batch_losses_of(model), params, toy_models.batch(2), trainable)
  assert set(terms) == {p for p in paths if "Dense_1" in p}


def test_ghost_norms_with_a_frozen_subset():
  model = toy_models.MODELS["attention"]
  params = toy_models.init(model)
  trainable = pytrees.trainable_mask(params, lambda path: "Dense_1" in path or "bias" in path)
  losses = batch_losses_of(model)
  batch = toy_models.batch(5, seed=3)
  np.testing.assert_allclose(
      np.sqrt(ghost.ghost_sq_norms(losses, params, batch, trainable)),
      np.sqrt(vmap_sq_norms(losses, params, batch, trainable)), rtol=1e-5)


RULES = [clipping.FlatClip(0.3), clipping.AutomaticClip(0.3, 0.01), clipping.NormalizedClip(0.3)]


@pytest.mark.parametrize("name,rule,frozen", [("conv", r, False) for r in RULES] + [
    (name, RULES[0], False) for name in sorted(MODELS) if name != "conv"] + [
    ("attention", RULES[0], True), ("strided_conv", RULES[1], True)] + [
    (name, "per_layer", False) for name in ("conv", "vit_scan", "conv1d")] + [
    ("strided_conv", "per_layer", True), ("wrn", "per_layer", True)])
def test_ghost_clipped_sum_equals_the_vmap_clipped_sum(name, rule, frozen):
  """Book-keeping (weighted sums of the layers' factored terms, no second backward pass) gives
  the vmap path's clipped sum, leaf by leaf: kernels (conv kernels re-laid out from patches),
  biases, norm scales, fallback leaves, and frozen leaves (zeros); per-layer clipping scales
  each layer's terms by that layer's own factor (groups of a scanned stack: one per layer kind,
  as on the vmap path). A scaled-down example's factor comes from an upper bound on its
  contribution's norm that covers float32 rounding relative to its per-position terms (a few
  units of 1e-4 of the norm here), not from the norm itself: hence rtol 1e-3."""
  model = MODELS[name]()
  params = toy_models.init(model)
  if rule == "per_layer":  # most (example, layer) pairs scaled down at this scale, not all
    rule = clipping.per_layer_clip(params, 2.0)
  trainable = (pytrees.trainable_mask(params, lambda path: "Dense_1" in path or "bias" in path
                                       or "Conv_1" in path) if frozen else None)
  losses = batch_losses_of(model)
  example_loss = lambda p, ex: losses(p, jax.tree_util.tree_map(lambda x: x[None], ex))[0]
  batch = toy_models.batch(12, seed=4, scale=3.0)
  mask = jnp.arange(12) < 10
  fast = jax.jit(lambda p: ghost.clipped_grad_sum(losses, p, batch, mask, rule,
                                                  microbatch_size=4, trainable=trainable))(params)
  slow = jax.jit(lambda p: clipping.clipped_grad_sum(example_loss, p, batch, mask, rule,
                                                     microbatch_size=4,
                                                     trainable=trainable))(params)
  for a, b in zip(jax.tree_util.tree_leaves(fast.grad_sum), jax.tree_util.tree_leaves(slow.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
  for a, b in zip(fast.stats, slow.stats):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert fast.sensitivity == slow.sensitivity


def random_mask(params, rows: bool, seed: int = 7):
  """A 0/1 element mask like params, about half ones: element by element, or (rows) by the last
  axis's index only (whole output rows, as `finetune.top_rows` makes)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 100))
  def leaf(w):
    shape = w.shape[-1:] if rows else w.shape
    return jnp.broadcast_to(jax.random.uniform(next(keys), shape) < 0.5, w.shape).astype(
        jnp.float32)
  return jax.tree_util.tree_map(leaf, params)


@pytest.mark.parametrize("name,rows", [(name, False) for name in (
    "strided_conv", "vit_scan", "embed", "conv1d", "wrn")] + [(name, True) for name in (
    "strided_conv", "vit_scan", "embed", "wrn")])
def test_ghost_with_an_element_mask_equals_vmap_of_the_masked_loss(name, rows):
  """Sparse fine-tuning: each per-example gradient is M ⊙ ∇ℓᵢ before clipping. Covers kernels
  (an input-dilated conv's patches in (C, kh, kw) order), scanned stacks, embeddings, modules'
  own ghost_grads (the ViT's token embedding; the WRN's factored WSConv terms, instantiated) and
  the vmap fallback. With masks of whole output rows (rows: `row_masks=True`) the masked terms
  stay factored (their norms are ghost norms, whose rounding bounds are wider: the factors of
  scaled-down examples differ by up to ~3e-4 relative on the WRN, hence its tolerance)."""
  model = MODELS[name]()
  params = toy_models.init(model)
  element_mask = random_mask(params, rows)
  if rows:
    assert all(finetune.is_row_mask(m) for m in jax.tree_util.tree_leaves(element_mask))
  losses = batch_losses_of(model)
  example_loss = lambda p, ex: losses(finetune.masked_params(p, element_mask),
                                      jax.tree_util.tree_map(lambda x: x[None], ex))[0]
  batch = toy_models.batch(8, seed=4, scale=3.0)
  mask = jnp.arange(8) < 7
  norms = jax.vmap(lambda ex: clipping.global_norm(jax.grad(example_loss)(params, ex)))(batch)
  # Midway between two real norms: about half the examples scaled down, none on the boundary.
  rule = clipping.FlatClip(float(np.mean(np.sort(norms[:7])[3:5])))
  fast = jax.jit(lambda p: ghost.clipped_grad_sum(losses, p, batch, mask, rule,
                                                  microbatch_size=4, element_mask=element_mask,
                                                  row_masks=rows))(params)
  slow = jax.jit(lambda p: clipping.clipped_grad_sum(example_loss, p, batch, mask, rule,
                                                     microbatch_size=4))(params)
  for a, b in zip(jax.tree_util.tree_leaves(fast.grad_sum), jax.tree_util.tree_leaves(slow.grad_sum)):
    # Element masks: atol 1e-6 as before; row masks: relative to the leaf's largest entry.
    scale = float(np.max(np.abs(b))) if rows else 1e-2
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=(5e-4 if name == "wrn" else 1e-4) * scale)
  for a, b in zip(fast.stats, slow.stats):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert 0 < float(fast.stats.num_clipped) < 7  # some examples scaled down, not all


@pytest.mark.parametrize("name", ["tiling_conv", "vit_scan", "embed", "wrn"])
def test_a_row_mask_keeps_each_term_factored_and_masks_exactly_its_gradients(name):
  """`layer_terms.masked(..., rows=True)` returns a term of the same kind (kernels: `Outer` with
  masked output gradients; embeddings, WSConv terms, norms and biases alike), or, for a kernel
  whose norm instantiates its gradients anyway (many positions), those gradients (`Summed`);
  either way its per-example gradients equal the instantiated gradients times the mask."""
  model = MODELS[name]()
  params = toy_models.init(model)
  element_mask = random_mask(params, rows=True, seed=3)
  masks = dict(zip(pytrees.leaf_paths(element_mask), jax.tree_util.tree_leaves(element_mask)))
  found = collect.leaf_terms(batch_losses_of(model), params, toy_models.batch(4, seed=1, scale=2.0),
                             None, "vmap")
  kinds = set()
  for path, (module, term, stacked) in found.items():
    over_stack = jax.vmap if stacked else (lambda f: f)
    as_rows = over_stack(functools.partial(layer_terms.masked, module, path[-1], rows=True))(
        term, masks[path])
    instantiated = over_stack(functools.partial(layer_terms.masked, module, path[-1]))(
        term, masks[path])
    assert isinstance(as_rows, (type(term), ghost_terms.Summed)), path
    kinds.add(type(as_rows).__name__)
    np.testing.assert_allclose(over_stack(lambda t: t.instantiate())(as_rows),
                               over_stack(lambda t: t.instantiate())(instantiated),
                               rtol=1e-5, atol=1e-6)
  assert "Outer" in kinds or "StandardizedConvTerm" in kinds


@pytest.mark.parametrize("rows", [True, False], ids=["row_mask", "element_mask"])
def test_masked_contributions_stay_within_the_clip_bound_whatever_the_mask(rows):
  """row_masks=True with a mask that is not one of whole rows (a misuse: the gradient clipped is
  then that of the mask's first row) still bounds each example's contribution by C: the norm and
  the sum are of the same masked term."""
  model = TokenMLP()
  params = toy_models.init(model)
  element_mask = random_mask(params, rows=False, seed=11)
  assert not all(finetune.is_row_mask(m) for m in jax.tree_util.tree_leaves(element_mask))
  losses = batch_losses_of(model)
  batch = toy_models.batch(16, seed=5, scale=50.0)
  rule = RULES[0]
  alone = jax.jit(jax.vmap(lambda one_hot: ghost.clipped_grad_sum(
      losses, params, batch, one_hot, rule, element_mask=element_mask,
      row_masks=rows).grad_sum))(jnp.eye(16))
  norms = jax.vmap(clipping.global_norm)(alone)
  assert float(jnp.min(norms)) > 0.5 * rule.sensitivity
  # Instantiated (element masks): the factor comes from the computed norm, whose rounding
  # relative to the norm itself is left out, as on the vmap path (here 0.3 in float32).
  assert float(jnp.max(norms)) <= rule.sensitivity * (1 + 1e-6)


def test_layers_ghost_cannot_handle_fail_loudly_when_asked():
  model = MODELS["conv1d"]()  # a 1-D convolution: a configuration ghost does not handle
  params = toy_models.init(model)
  with pytest.raises(ghost.GhostUnsupportedError, match="kernel"):
    ghost.ghost_sq_norms(batch_losses_of(model), params, toy_models.batch(2), fallback="error")


@pytest.mark.parametrize("name", ["vit", "vit_scan", "vit_resized"])
def test_the_vit_needs_no_fallback(name):
  """Its class token and position embedding come from TokenEmbedding.ghost_grads; its scanned
  blocks' layers are read slice by slice (the WRN: `test_ghost_norms_equal_vmap_norms`)."""
  model = MODELS[name]()
  params = toy_models.init(model)
  losses = batch_losses_of(model)
  batch = toy_models.batch(4, seed=6)
  np.testing.assert_allclose(
      np.sqrt(ghost.ghost_sq_norms(losses, params, batch, fallback="error")),
      np.sqrt(vmap_sq_norms(losses, params, batch)), rtol=1e-5)


_TERM_ORDER = """
import flax.linen as nn
from dpjax.models import wrn
from dpjax.privacy import ghost
from tests import toy_models

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(wrn.WSConv(4, (3, 3), strides=4)(x).reshape((x.shape[0], -1)))

model = Net()
print(list(ghost.per_example_terms(toy_models.batch_losses(model), toy_models.init(model),
                                   toy_models.batch(2), fallback="error")))
"""


def test_the_order_of_terms_does_not_depend_on_the_hash_seed():
  """A module's ghost_grads terms, hence the order of the sums over them, follow its params, not
  a set of their names (whose order varies with PYTHONHASHSEED: the processes of one
  multi-process run would trace different programs). Seeds 0 and 1 order the set {kernel, gain,
  bias} differently (CPython 3.11)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
  orders = [subprocess.run([sys.executable, "-c", _TERM_ORDER], cwd=root, capture_output=True,
                           text=True, check=True, env=dict(env, PYTHONHASHSEED=seed)).stdout
            for seed in ("0", "1")]
  assert "gain" in orders[0] and orders[0] == orders[1]


def test_a_subclass_of_a_self_described_layer_is_not_trusted():
  class ShiftedEmbedding(models.vit.TokenEmbedding):  # inherits ghost_grads, changes the maths
    def __call__(self, patches):
      return 2.0 * super().__call__(patches)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      tokens = ShiftedEmbedding()(x.reshape((x.shape[0], 4, -1)))
      return nn.Dense(3)(tokens.mean(axis=1))
  model = Model()
  params = toy_models.init(model)
  losses = batch_losses_of(model)
  batch = toy_models.batch(4, seed=7)
  with pytest.raises(ghost.GhostUnsupportedError, match="position_embedding"):
    ghost.ghost_sq_norms(losses, params, batch, fallback="error")
  np.testing.assert_allclose(np.sqrt(ghost.ghost_sq_norms(losses, params, batch)),
                             np.sqrt(vmap_sq_norms(losses, params, batch)), rtol=1e-5)


def test_ghost_grads_that_leave_a_param_out_are_refused():
  class Incomplete(models.vit.TokenEmbedding):
    def ghost_grads(self, inputs, output_grads):
      grads = super().ghost_grads(inputs, output_grads)
      return {"class_token": grads["class_token"]}

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(Incomplete()(x.reshape((x.shape[0], 4, -1))).mean(axis=1))
  model = Model()
  with pytest.raises(ghost.GhostUnsupportedError, match="position_embedding"):
    ghost.ghost_sq_norms(batch_losses_of(model), toy_models.init(model), toy_models.batch(2))


def test_a_subclass_of_a_supported_layer_is_not_trusted():
  class ScaledDense(nn.Dense):  # extra behaviour ghost knows nothing about
    def __call__(self, x):
      return 2.0 * super().__call__(x) ** 2

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ScaledDense(3)(x.reshape((x.shape[0], -1)))

  assert_fallback_is_right_or_refused(Net(), toy_models.batch(4, seed=1), "ScaledDense_0")


def assert_fallback_is_right_or_refused(model, batch, unsupported):
  """Leaves ghost cannot read get vmap norms (right), or fallback='error' names them."""
  params = toy_models.init(model)
  losses = batch_losses_of(model)
  np.testing.assert_allclose(np.sqrt(ghost.ghost_sq_norms(losses, params, batch)),
                             np.sqrt(vmap_sq_norms(losses, params, batch)), rtol=1e-5)
  with pytest.raises(ghost.GhostUnsupportedError, match=unsupported):
    ghost.ghost_sq_norms(losses, params, batch, fallback="error")


def test_an_embedding_tied_to_the_output_goes_to_the_fallback():
  assert_fallback_is_right_or_refused(TiedEmbedding(), toy_models.batch(4, seed=1, scale=2.0),
                                      "embedding")


def test_a_leaf_without_a_group_is_refused():
  """(A rule without groups and factors cannot be made at all: clipping_test.)"""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  losses, batch = batch_losses_of(model), toy_models.batch(2)
  rule = clipping.GroupClip({"Dense_0": 1.0}, group_of=lambda path: path[0])
  with pytest.raises(ValueError, match=r"Dense_1/(kernel|bias) falls in group 'Dense_1'"):
    ghost.clipped_grad_sum(losses, params, batch, jnp.ones(2), rule)


def test_a_loss_under_remat_gets_the_same_norms():
  """Probes and inputs are flax variables, so they pass through jax.checkpoint."""
  model = toy_models.MODELS["conv"]
  params = toy_models.init(model)
  batch = toy_models.batch(4)
  plain = batch_losses_of(model)
  got = jax.jit(lambda p: ghost.ghost_sq_norms(jax.checkpoint(plain), p, batch))(params)
  np.testing.assert_allclose(np.sqrt(got), np.sqrt(vmap_sq_norms(plain, params, batch)),
                             rtol=1e-5)


def test_a_scan_that_does_not_stack_ghost_variables_goes_to_the_fallback():
  """flax drops the undeclared collections inside the scan: its layers are never read, so their
  params are per-example-differentiated by the fallback (or refused), never left out."""
  assert_fallback_is_right_or_refused(ScannedDense(stacked="params"), toy_models.batch(3),
                                      "ScanBlock_0/Dense_0/kernel")


def test_a_loss_that_does_not_pass_ghost_variables_is_refused():
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  plain = batch_losses_of(model)
  losses = lambda p, b, ghost_variables=None: plain(p, b)
  with pytest.raises(ghost.GhostUnsupportedError, match="apply_model"):
    ghost.ghost_sq_norms(losses, params, toy_models.batch(2))


class TokenMLP(nn.Module):
  """Dense layers over 16 tokens in bfloat16 (float32 params): kernel terms are rounded."""
  @nn.compact
  def __call__(self, x):
    tokens = x.reshape((x.shape[0], 16, -1))
    tokens = nn.Dense(32, dtype=jnp.bfloat16)(tokens)
    tokens = nn.Dense(32, dtype=jnp.bfloat16)(jnp.tanh(tokens))
    return nn.Dense(3, dtype=jnp.bfloat16)(tokens.mean(axis=1)).astype(jnp.float32)


@pytest.mark.parametrize("rule", RULES[:2])
def test_bfloat16_contributions_stay_within_the_clip_bound(rule):
  """Each example's clipped contribution, computed alone from bfloat16 activations and output
  gradients, has norm ≤ C: the rounding of the scaled output gradients is covered by the factor."""
  model = TokenMLP()
  params = toy_models.init(model)
  losses = batch_losses_of(model)
  batch = toy_models.batch(16, seed=5, scale=50.0)
  alone = jax.jit(jax.vmap(lambda one_hot: ghost.clipped_grad_sum(
      losses, params, batch, one_hot, rule).grad_sum))(jnp.eye(16))
  norms = jax.vmap(clipping.global_norm)(alone)
  assert float(jnp.min(norms)) > 0.5 * rule.sensitivity  # scaled down, not vanished
  assert float(jnp.max(norms)) <= rule.sensitivity


def test_bfloat16_weight_standardised_contributions_stay_within_the_clip_bound():
  """The WRN in bfloat16 (params cast, as the trainer does): each WSConv's kernel and gain
  gradients are pulled back from a sum rounded in bfloat16, and the factor covers that rounding
  times the pullback's gain."""
  model = MODELS["wrn"]()
  params = toy_models.init(model)
  losses = step_lib.make_batch_losses(model, "bfloat16")
  batch = toy_models.batch(32, seed=5)
  rule = clipping.FlatClip(0.05)  # all scaled down; without the slack, some end above C
  alone = jax.jit(jax.vmap(lambda one_hot: ghost.clipped_grad_sum(
      losses, params, batch, one_hot, rule, fallback="error").grad_sum))(jnp.eye(32))
  norms = jax.vmap(clipping.global_norm)(alone)
  assert float(jnp.min(norms)) > 0.5 * rule.sensitivity
  assert float(jnp.max(norms)) <= rule.sensitivity


def test_weight_standardised_kernel_and_gain_norms_share_their_matmuls():
  """A WSConv's kernel (closed form, few positions) and gain norms both need the patches times s;
  they are separate terms, so XLA's common-subexpression pass must merge the two: together they
  compile to no more matmuls than the kernel's norm alone."""
  m, t, n, p = 2, 16, 3 * 3 * 64, 64
  assert ghost.ghost_norm_is_cheaper(t, n, p)  # the closed form, which takes the patches times s
  rng = np.random.default_rng(0)
  args = (jnp.asarray(rng.standard_normal((m, t, n)), jnp.bfloat16),
          jnp.asarray(rng.standard_normal((m, t, p)), jnp.bfloat16),
          wrn.standardize_kernel(jnp.asarray(rng.standard_normal((n, p)), jnp.float32), 1e-4),
          jnp.ones(p), jnp.full(p, n ** -0.5), jnp.ones(p))

  def dots(*parts):
    norms = lambda *a: [wrn.StandardizedConvTerm(*a, part=part).norm_bound()
                        for part in parts]
    return jax.jit(norms).lower(*args).compile().as_text().count(" dot(")
  assert dots("gain") >= 2  # high and low halves of s
  assert dots("kernel", "gain") == dots("kernel")


def test_bfloat16_per_layer_contributions_stay_within_each_layers_bound():
  """Per-layer clipping in bfloat16: each layer's part of each example's contribution has norm
  ≤ its C_g (the rounding slack is taken per group)."""
  model = TokenMLP()
  params = toy_models.init(model)
  rule = clipping.per_layer_clip(params, 0.3)
  batch = toy_models.batch(16, seed=5, scale=50.0)
  alone = jax.jit(jax.vmap(lambda one_hot: ghost.clipped_grad_sum(
      batch_losses_of(model), params, batch, one_hot, rule).grad_sum))(jnp.eye(16))
  for layer, part in alone.items():
    norms = jax.vmap(clipping.global_norm)(part)
    assert float(jnp.max(norms)) <= rule.clip_norms[layer], layer
    assert float(jnp.max(norms)) > 0.5 * rule.clip_norms[layer], layer


class CancellingTokens(nn.Module):
  """16 tokens of width 4 through two linear Dense layers (no bias; the first's norm from its
  instantiated gradient, the second's a ghost norm) and a mean: each kernel's per-example
  gradient is (Σₜ aₜ) gᵀ, which `cancelling_batch` makes small against Σₜ ‖aₜ‖‖g‖, so that
  rounding is large against the example's norm."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    tokens = x.reshape((x.shape[0], 16, -1))
    h = nn.Dense(32, use_bias=False, dtype=self.dtype)(tokens)
    h = nn.Dense(32, use_bias=False, dtype=self.dtype)(h)
    return nn.Dense(3, use_bias=False, dtype=self.dtype)(h.mean(axis=1)).astype(jnp.float32)


def cancelling_batch(n, seed=0, scale=200.0, eta=1e-4):
  """Images whose second 8 tokens are minus the first 8 plus noise of relative size eta."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  half = jax.random.normal(k1, (n, 8, 4))
  tokens = jnp.concatenate([half, -half + eta * jax.random.normal(k2, (n, 8, 4))], axis=1)
  return dict(image=(scale * tokens).reshape((n,) + toy_models.IMAGE_SHAPE),
              label=jax.random.randint(k3, (n,), 0, 3))


def contributions_alone(losses, params, batch, rule):
  """Each example's contribution to the ghost clipped sum (a one-hot mask), float64 leaves."""
  n = len(batch["label"])
  alone = jax.jit(jax.vmap(lambda one_hot: ghost.clipped_grad_sum(
      losses, params, batch, one_hot, rule).grad_sum))(jnp.eye(n))
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), alone)


def float64_norms(tree):
  return np.sqrt(sum(np.sum(np.square(x.reshape(x.shape[0], -1)), axis=1)
                     for x in jax.tree_util.tree_leaves(tree)))


# What the bound leaves to float32 rounding, as the vmap path does: the factor's division (a few
# units of 2⁻²⁴) and each leaf's sum of k ≤ 1024 squares (≤ k·2⁻²⁴/2 ≈ 3e-5 of the norm).
BOUND_RTOL = 5e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("rule", [clipping.NormalizedClip(10.0), clipping.AutomaticClip(10.0, 0.01),
                                  clipping.FlatClip(1.0)], ids=["normalized", "automatic", "flat"])
def test_contributions_that_cancel_across_positions_stay_within_the_bound(rule, dtype):
  """Normalized and automatic clipping scale small gradients UP, and with them the rounding of
  the scaled factor and the error of a norm that cancels across positions, both large against
  the norm: the contributions reached 1.43·R (normalized) and 1.012·R (automatic) in float32,
  1.11·R and 1.04·R in bfloat16. The factor now comes from an upper bound on the norm of what
  the weighted sums add, rounding included, for every rule."""
  model = CancellingTokens(dtype)
  params = toy_models.init(model)
  norms = float64_norms(contributions_alone(batch_losses_of(model), params, cancelling_batch(16),
                                            rule))
  assert norms.max() <= rule.sensitivity * (1 + BOUND_RTOL)
  assert norms.max() > 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_per_layer_contributions_that_cancel_stay_within_each_layers_bound(dtype):
  model = CancellingTokens(dtype)
  params = toy_models.init(model)
  rule = clipping.per_layer_clip(params, 0.3)
  alone = contributions_alone(batch_losses_of(model), params, cancelling_batch(16), rule)
  for layer, part in alone.items():
    assert float64_norms(part).max() <= rule.clip_norms[layer] * (1 + BOUND_RTOL), layer


class SmallWSConv(nn.Module):
  """Two weight-standardised convs: the first's kernel norm from its instantiated gradient (64
  positions), the second's from the Grams (4 positions); then a Dense."""
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(wrn.WSConv(4, (3, 3))(x))
    x = wrn.WSConv(16, (3, 3), strides=4)(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


SMALL_MODELS = {"dense": lambda: toy_models.MODELS["dense"],
                "conv": lambda: toy_models.MODELS["conv"], "token_mlp": TokenMLP,
                "wsconv": SmallWSConv, "scanned": ScannedDense, "conv1d": Conv1D}


@pytest.mark.parametrize("name,rule", [
    (name, rule) for name in ("dense", "conv", "token_mlp") for rule in RULES[:2]] + [
    ("scanned", "per_layer"), ("wsconv", RULES[2]), ("conv1d", RULES[0])])
def test_an_example_with_an_inf_or_nan_input_adds_exactly_zero(name, rule):
  """An inf or a NaN input makes that example's layer inputs and output gradients non-finite
  (bfloat16 too; scanned stacks, WSConv terms and the vmap fallback alike); its factor is 0 and its
  rows are zeroed in every weighted matmul (0·inf is NaN), so the sum equals the one without it
  (not NaN: its presence would show) and the statistics stay finite."""
  model = SMALL_MODELS[name]()
  params = toy_models.init(model)
  if rule == "per_layer":
    rule = clipping.per_layer_clip(params, 1.0)
  losses = batch_losses_of(model)
  batch = toy_models.batch(6, seed=3, scale=3.0)
  batch = dict(batch, image=batch["image"].at[1, 2, 3, 0].set(jnp.inf).at[4, 0, 0, 0].set(jnp.nan))
  mask = np.array([1, 1, 1, 1, 1, 0], bool)
  clip = jax.jit(lambda m: ghost.clipped_grad_sum(losses, params, batch, m, rule,
                                                  fallback="error" if name != "conv1d" else "vmap"))
  out, without = clip(mask), clip(mask & ~np.isin(np.arange(6), [1, 4]))
  for a, b in zip(jax.tree_util.tree_leaves(out.grad_sum),
                  jax.tree_util.tree_leaves(without.grad_sum)):
    np.testing.assert_array_equal(a, b)
  assert all(np.isfinite(float(x)) for x in out.stats)
  assert float(out.stats.num_clipped) >= 2.0


class BatchCentred(nn.Module):
  """Subtracts the batch mean of its hidden units: a model that mixes examples without
  BatchNorm (and without 'batch_stats')."""
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x.reshape((x.shape[0], -1)))
    return nn.Dense(3)(jnp.tanh(h - h.mean(axis=0, keepdims=True)))


def test_a_model_that_mixes_examples_is_refused():
  """Ghost clipping accepts a batch-mean model silently, and replacing one example moves its
  clipped sum by more than the bound 2C on a replacement (2.68C here); the check refuses it."""
  model = BatchCentred()
  params = toy_models.init(model)
  losses, batch, rule = batch_losses_of(model), toy_models.batch(4), clipping.FlatClip(1.0)
  clip = jax.jit(lambda b: ghost.clipped_grad_sum(losses, params, b, jnp.ones(4, bool),
                                                  rule).grad_sum)
  replaced = dict(batch, image=batch["image"].at[0].set(100.0))
  moved = clipping.global_norm(jax.tree_util.tree_map(jnp.subtract, clip(batch), clip(replaced)))
  assert float(moved) > 2 * rule.sensitivity
  with pytest.raises(ghost.ExamplesMixedError,
                     match="mixes the examples.*per_example_method='vmap'"):
    ghost.check_examples_independent(losses, params, batch)


@jax.custom_vjp
def _mix_cotangents(x):
  return x


_mix_cotangents.defvjp(lambda x: (x, None),
                       lambda _, g: (g + jnp.mean(g, axis=0, keepdims=True),))


class BackwardMixing(nn.Module):
  """Keeps examples apart going forward (the losses), mixes their output gradients going back."""
  @nn.compact
  def __call__(self, x):
    h = _mix_cotangents(nn.Dense(8)(x.reshape((x.shape[0], -1))))
    return nn.Dense(3)(jnp.tanh(h))


def test_a_backward_pass_that_mixes_examples_is_refused():
  """Only the other examples' ghost norms move, not their losses: the check reads both."""
  model = BackwardMixing()
  with pytest.raises(ghost.ExamplesMixedError, match="gradient norms"):
    ghost.check_examples_independent(batch_losses_of(model), toy_models.init(model),
                                     toy_models.batch(4))


@pytest.mark.parametrize("name,dtype", [("cnn_tanh", "float32"), ("vit", "bfloat16"),
                                        ("wrn", "float32"), ("resnet", "bfloat16"),
                                        ("conv1d", "float32")])
def test_models_that_keep_examples_apart_pass_the_independence_check(name, dtype):
  """The repo's models (built small; the ViT in bfloat16, as benchmarked) and one whose layer
  goes to the vmap fallback, through the trainer's batch losses."""
  if name == "cnn_tanh":  # its convolutions need 16 x 16 images at least
    model = models.build_model("cnn_tanh_mnist", 3, input_shape=(16, 16, 1))
    batch = dict(image=jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 1)),
                 label=jnp.arange(4) % 3)
    params = model.init(jax.random.PRNGKey(0), batch["image"][:1])["params"]
  else:
    model = MODELS[name]()
    batch, params = toy_models.batch(4, seed=1), toy_models.init(model)
  ghost.check_examples_independent(step_lib.make_batch_losses(model, dtype), params, batch)
