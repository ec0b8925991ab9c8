"""DP fine-tuning: which parameters train (layer selections), and sparse fine-tuning masks.

Two kinds of restriction, both pytrees with the params' structure:
  selection (bool per leaf): the leaves that train at all. Frozen leaves get no per-example
    gradients (the DP step differentiates only the selected leaves: `pytrees.partition`) and
    exactly zero update. The layer-selection hyperparameter of Cattan et al. 2022.
  mask (float32 per element, 0/1): within the selected leaves, which elements train. The DP step
    sees M ⊙ ∇ℓᵢ (so clipping and noise act on the subnetwork only) and the update is M ⊙ update:
    the parameterisation W = W₀ + M ⊙ ΔW of SPARTA (Makni et al. 2025) without materialising W₀
    and ΔW (`delta_params` is that form, and the tests check both give the same training).

SPARTA's private mask selection (`score_rows` / `top_rows`): during `selection_steps` DP steps
with no update, each step's *noisy* clipped gradient sum (the step's own Gaussian release, so no
extra privacy cost beyond counting the step) is accumulated as |noisy sum| / B; each prunable
kernel's output rows (the last axis in Flax: Dense [in, out], Conv [kh, kw, in, out]) are scored
by their summed accumulator and the top `fraction` of rows per leaf train afterwards. Baselines:
magnitude pruning of the pre-trained weights (`magnitude_rows`) and random rows (`random_rows`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import pytrees
from dpjax.privacy import randomness

PyTree = Any
SELECTIONS = ("all", "head", "head_norms", "bias", "last_blocks", "attention", "mlp", "patterns")


class SelectionError(ValueError):
  """A parameter selection or mask does not fit the model."""


def _is_norm(path: tuple[str, ...], module_leaves: dict[tuple[str, ...], set]) -> bool:
  """A leaf of a normalisation layer: its module has a `scale` leaf."""
  return "scale" in module_leaves[path[:-1]]


def call_order(model: nn.Module, params: PyTree, example: jax.Array) -> list[str]:
  """The model's top-level submodules in the order its forward pass calls them (params dicts are
  sorted by name, which loses it): example is one input batch, e.g. zeros [1, H, W, C]."""
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 1 and path[0] not in order:
      order.append(path[0])
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, example)
  return order


def _top_modules(paths: list[tuple[str, ...]], order: Sequence[str] | None) -> list[str]:
  """Top-level module names that own params, in call order (`call_order`), else by name."""
  owners = []
  for path in paths:
    if len(path) > 1 and path[0] not in owners:
      owners.append(path[0])
  if order is None:
    return owners
  return [m for m in order if m in owners] + [m for m in owners if m not in order]


def head_module(params: PyTree, order: Sequence[str] | None = None) -> str:
  """The classifier head: the top-level module named 'head', else the last one called."""
  modules = _top_modules(pytrees.leaf_paths(params), order)
  if not modules:
    raise SelectionError("The params have no modules to select from.")
  return "head" if "head" in modules else modules[-1]


def select(params: PyTree, selection: str = "all", num_blocks: int = 1,
           patterns: str = "", order: Sequence[str] | None = None) -> PyTree:
  """A bool pytree of the leaves that train.

  selection:
    all          every leaf;
    head         the classifier head (`head_module`);
    head_norms   head + every normalisation layer's scale and bias;
    bias         head + every bias (BitFit);
    last_blocks  head + the last `num_blocks` top-level modules that own a kernel before it, and
                 any normalisation layer after them (ViT: blocks, final_norm, head), in the
                 forward pass's order: pass `order` (`call_order`; without it, name order);
    attention    head + attention projections (paths with an 'attention…' module, norms excluded);
    mlp          head + MLP layers (paths with an 'mlp…' module, norms excluded); both refused
                 for a model without such modules (the WRN, the CNNs);
    patterns     leaves whose 'a/b/c' path matches any of the comma-separated regexes `patterns`.
  Raises SelectionError for an unknown selection or one that matches no parameter.
  """
  paths = pytrees.leaf_paths(params)
  module_leaves: dict[tuple[str, ...], set] = {}
  for path in paths:
    module_leaves.setdefault(path[:-1], set()).add(path[-1])
  if selection not in SELECTIONS:
    raise SelectionError(f"Unknown finetune selection {selection!r}; choose one of {SELECTIONS}.")
  head = head_module(params, order) if selection not in ("all", "patterns") else None
  in_head = lambda path: path[0] == head
  component = lambda path, prefix: any(
      c.startswith(prefix) for c in path[:-1]) and not _is_norm(path, module_leaves)
  if selection == "last_blocks":
    if num_blocks < 0:
      raise SelectionError(f"finetune.num_blocks must be >= 0, got {num_blocks}.")
    owners = [m for m in _top_modules(paths, order) if m != head
              and any(p[0] == m and p[-1] == "kernel" for p in paths)]
    chosen = owners[len(owners) - num_blocks:] if num_blocks else []
    modules = _top_modules(paths, order)
    first = min((modules.index(m) for m in chosen), default=modules.index(head))
    after_norms = {m for m in modules[first:]
                   if all(_is_norm(p, module_leaves) for p in paths if p[0] == m)}
    keep = set(chosen) | after_norms | {head}
  regexes = [re.compile(p.strip()) for p in patterns.split(",") if p.strip()]
  if selection == "patterns" and not regexes:
    raise SelectionError("finetune.selection='patterns' needs finetune.patterns (comma-separated "
                         "regexes over 'module/…/leaf' paths).")
  rules = {
      "all": lambda p: True,
      "head": in_head,
      "head_norms": lambda p: in_head(p) or _is_norm(p, module_leaves),
      "bias": lambda p: in_head(p) or p[-1] == "bias",
      "last_blocks": lambda p: p[0] in keep,
      "attention": lambda p: in_head(p) or component(p, "attention"),
      "mlp": lambda p: in_head(p) or component(p, "mlp"),
      "patterns": lambda p: any(r.search("/".join(p)) for r in regexes),
  }
  chosen_leaves = pytrees.trainable_mask(params, rules[selection])
  if not any(jax.tree_util.tree_leaves(chosen_leaves)):
    raise SelectionError(
        f"finetune selection {selection!r}{f' (patterns {patterns!r})' if patterns else ''} "
        f"matches no parameter. Parameter paths: {['/'.join(p) for p in paths]}")
  if selection in ("attention", "mlp") and not any(
      component(p, selection) for p in paths if not in_head(p)):
    raise SelectionError(  # else it would silently train the head alone
        f"finetune selection {selection!r} needs modules named '{selection}…' (a ViT's "
        f"attention / mlp_in, mlp_out); this model has none: {_top_modules(paths, order)}. "
        "Use 'head' for the head alone, or 'patterns'.")
  return chosen_leaves


# ------------------------------------------------------------------------------------------------
# Element masks


def check_mask(params: PyTree, mask: PyTree) -> None:
  """Raises SelectionError unless `mask` has params' structure and every leaf's shape."""
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(mask):
    raise SelectionError(f"The mask's structure does not match the params': "
                         f"{jax.tree_util.tree_structure(mask)} vs "
                         f"{jax.tree_util.tree_structure(params)}.")
  bad = [f"{'/'.join(path)}: param {p.shape} vs mask {np.shape(m)}"
         for path, p, m in zip(pytrees.leaf_paths(params), jax.tree_util.tree_leaves(params),
                               jax.tree_util.tree_leaves(mask)) if p.shape != np.shape(m)]
  if bad:
    raise SelectionError("Mask shapes do not fit their parameters: " + "; ".join(bad))


def is_row_mask(mask: jax.Array) -> bool:
  """Whether a mask leaf masks whole output rows: it depends on its last axis only (equal along
  every other axis), as every mask built here is (`selection_mask`, `warmup_mask`, `top_rows`).
  The trainer's ghost path relies on it to keep masked kernels factored."""
  mask = np.asarray(mask)
  return mask.ndim <= 1 or bool(np.all(mask == mask.reshape(-1, mask.shape[-1])[0]))


def check_row_masks(mask: PyTree) -> None:
  """Raises SelectionError unless every leaf of the element mask masks whole output rows
  (`is_row_mask`): the trainer's masks must, a mask method of one's own included."""
  bad = ["/".join(path) for path, m in zip(pytrees.leaf_paths(mask),
                                           jax.tree_util.tree_leaves(mask)) if not is_row_mask(m)]
  if bad:
    raise SelectionError("The trainer's sparse masks must mask whole output rows (a leaf's mask "
                         f"may vary along its last axis only); not so for {', '.join(bad)}.")


def selection_mask(params: PyTree, selection: PyTree) -> PyTree:
  """The float32 element mask of a leaf selection: ones on selected leaves, zeros elsewhere."""
  return jax.tree_util.tree_map(lambda p, s: jnp.full(p.shape, float(bool(s)), jnp.float32),
                                params, selection)


def masked_params(params: PyTree, mask: PyTree) -> PyTree:
  """Params with the same values whose gradient is M ⊙ ∇: M·W + (1 − M)·stop_gradient(W)."""
  return jax.tree_util.tree_map(
      lambda w, m: (m * w + (1 - m) * jax.lax.stop_gradient(w)).astype(w.dtype), params, mask)


def delta_params(base: PyTree, delta: PyTree, mask: PyTree) -> PyTree:
  """W = W₀ + M ⊙ ΔW (the explicit sparse fine-tuning parameterisation)."""
  return jax.tree_util.tree_map(lambda w, d, m: w + m * d, base, delta, mask)


class MaskState(NamedTuple):
  """The optimizer-state part of `mask_updates`: the element mask and the selection scores."""
  mask: PyTree
  scores: PyTree


def mask_updates(initial_mask: PyTree) -> optax.GradientTransformation:
  """Multiplies updates by the mask held in its state (frozen elements: exactly zero update).

  Chain it last, after the optimizer (and its weight decay). The mask lives in the optimizer
  state, so checkpoints keep it and `set_mask` changes it without rebuilding any jitted step.
  """
  def init(params):
    check_mask(params, initial_mask)
    return MaskState(jax.tree_util.tree_map(lambda m: jnp.asarray(m, jnp.float32), initial_mask),
                     jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: (u * m).astype(u.dtype), updates, state.mask), state
  return optax.GradientTransformation(init, update)


def find_mask_state(opt_state: PyTree) -> MaskState | None:
  """The `MaskState` inside an optimizer state, or None."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskState))
           if isinstance(s, MaskState)]
  return found[0] if found else None


def replace_mask_state(opt_state: PyTree, new: MaskState) -> PyTree:
  return jax.tree_util.tree_map(lambda s: new if isinstance(s, MaskState) else s, opt_state,
                                is_leaf=lambda x: isinstance(x, MaskState))


# ------------------------------------------------------------------------------------------------
# Row selection (SPARTA) and its baselines


def prunable(params: PyTree, selection: PyTree, order: Sequence[str] | None = None) -> PyTree:
  """The leaves whose rows are selected: selected kernels (leaves named `kernel`, ndim > 1)
  outside the head. Other many-dimensional leaves train whole: a ViT's attention biases
  [heads, head_dim], its class token and position embedding are not weight matrices."""
  head = head_module(params, order)

  def is_rows(path, p, s):
    names = pytrees.path_to_names(path)
    return bool(s) and p.ndim > 1 and names[-1] == "kernel" and names[0] != head
  return jax.tree_util.tree_map_with_path(is_rows, params, selection)


def _check_fraction(fraction: float) -> None:
  if not 0 < fraction <= 1:
    raise SelectionError(f"The kept fraction of rows must be in (0, 1], got {fraction}.")


def top_rows(row_scores: PyTree, params: PyTree, selection: PyTree, fraction: float,
             order: Sequence[str] | None = None) -> PyTree:
  """Element mask: on each prunable leaf the top `fraction` of output rows (last axis) by
  row_scores (a pytree of [rows] arrays with params' structure; only prunable leaves' are read)
  train; every other selected leaf trains whole; unselected leaves stay frozen. Ties go to the
  lower index."""
  _check_fraction(fraction)
  rows_of = prunable(params, selection, order)

  def leaf_mask(p, s, is_rows, scores):
    if not is_rows:
      return jnp.full(p.shape, float(bool(s)), jnp.float32)
    rows = p.shape[-1]
    keep = max(1, int(round(fraction * rows)))
    order = jnp.argsort(-jnp.asarray(scores), stable=True)
    chosen = jnp.zeros(rows, jnp.float32).at[order[:keep]].set(1.0)
    return jnp.broadcast_to(chosen, p.shape).astype(jnp.float32)
  return jax.tree_util.tree_map(leaf_mask, params, selection, rows_of, row_scores)


def score_rows(scores: PyTree) -> PyTree:
  """Per-output-row sums of accumulated |noisy gradient| scores: leaves [*, rows] -> [rows]."""
  return jax.tree_util.tree_map(
      lambda s: jnp.maximum(jnp.sum(s.reshape(-1, s.shape[-1]), axis=0), 0.0), scores)


def magnitude_rows(params: PyTree) -> PyTree:
  """Baseline: per-output-row L1 magnitude of the (pre-trained) weights."""
  return score_rows(jax.tree_util.tree_map(jnp.abs, params))


def random_rows(params: PyTree, seed: int) -> PyTree:
  """Baseline: uniformly random row scores."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(randomness.stream_key(seed, "finetune random rows"), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [jax.random.uniform(k, (p.shape[-1],)) for k, p in zip(keys, leaves)])


def accumulate_scores(scores: PyTree, noisy_grad: PyTree) -> PyTree:
  """scores + |noisy_grad|, noisy_grad = (Σᵢ clip(gᵢ) + noise) / B as the noise transformation
  releases it (post-processing of the step's Gaussian release)."""
  return jax.tree_util.tree_map(lambda s, g: s + jnp.abs(g), scores, noisy_grad)


def warmup_mask(params: PyTree, selection: PyTree, order: Sequence[str] | None = None) -> PyTree:
  """SPARTA's warm-up: prunable leaves frozen (mask 0), every other selected leaf trains."""
  rows_of = prunable(params, selection, order)
  return jax.tree_util.tree_map(
      lambda p, s, r: jnp.full(p.shape, float(bool(s) and not r), jnp.float32),
      params, selection, rows_of)


def kept_fraction(mask: PyTree, params: PyTree, selection: PyTree,
                  order: Sequence[str] | None = None) -> dict[str, float]:
  """{leaf path: fraction of its elements that train} for the prunable leaves."""
  rows_of = prunable(params, selection, order)
  out = {}
  for path, m, r in zip(pytrees.leaf_paths(params), jax.tree_util.tree_leaves(mask),
                        jax.tree_util.tree_leaves(rows_of)):
    if r:
      out["/".join(path)] = float(jnp.mean(m))
  return out
