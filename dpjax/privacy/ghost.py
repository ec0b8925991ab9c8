"""Ghost clipping: per-example gradient norms without per-example gradients (Li et al. 2022).

One microbatch of m examples costs one batched forward and backward pass, as non-private
training does (book-keeping, Bu et al. 2023):
  1. a forward pass in which every supported layer's output gets a zero "probe" added (a flax
     variable of collection PROBES); the gradient of Σᵢ ℓᵢ w.r.t. the probes is each example's
     output gradient gᵢ (rows do not interact: no BatchNorm), and each layer's input aᵢ is sown
     into collection INPUTS. No parameter gradient is formed in this pass. Being flax variables,
     probes and inputs follow `nn.scan` (a scanned stack of blocks, stacked params) and
     `nn.remat`/`jax.checkpoint`: a scanned layer's norms are summed over its slices and its
     clipped sum is formed slice by slice. Each parameter's per-example gradient is then a factored term:
       Dense / DenseGeneral / Conv (via its patches) kernel, T positions (tokens, pixels):
         ∇ᵢ = Σₜ aᵢₜ gᵢₜᵀ, whose squared norm is Σₜ,ₛ (aₜ·aₛ)(gₜ·gₛ) ("ghost norm", O(T²(d+p)))
         or, when cheaper, that of the instantiated gradient (O(T·d·p)): fastDP's mixed rule;
       Embed table, T looked-up rows idxₜ: ∇ᵢ = Σₜ e_{idxₜ} gₜᵀ, squared norm
         Σₜ,ₛ [idxₜ = idxₛ] (gₜ·gₛ); its clipped sum is a scatter-add of the wᵢgᵢₜ (float32);
       biases Σₜ gₜ; LayerNorm / GroupNorm scale Σₜ gₜ ⊙ x̂ₜ and bias Σₜ gₜ (small, instantiated).
  2. each example's factor wᵢ from the clip rule and a bound on its norm (below, "Precision");
     an example whose terms hold an inf or NaN gets wᵢ = 0 and its rows are zeroed (`where`, as
     padded rows are), so it adds exactly 0. The clipped sum is then, layer by
     layer, Σᵢ wᵢ∇ᵢ = Σᵢ,ₜ (wᵢaᵢₜ) gᵢₜᵀ or aᵢₜ (wᵢgᵢₜ)ᵀ (whichever factor is narrower is scaled):
     one matmul per kernel, the same one a backward pass makes.

The loss must be written so that ghost can pass its variables in: see `BatchLosses` and
`apply_model`.

Precision and the clip bound: matmuls accumulate in float32 (float32 operands at full precision,
no TF32). The norm that picks an example's factor wᵢ and the sum that wᵢ scales are computed
differently (Gram products; one matmul), and both round relative to the example's per-position
terms Σₜ‖aₜ‖‖gₜ‖, which cancellation across positions (tokens, pixels) can make arbitrarily
larger than its norm; wᵢaᵢ or wᵢgᵢ is also rounded to the activations' dtype before the matmul.
So wᵢ is computed, for every rule, from an upper bound Uᵢ on the norm of what the sums add for the
example per unit wᵢ, all of that rounding included (`NormBound`, `_example_weights`): every
rule's factor has factor(U)·U ≤ C, whether it scales down (flat) or up (automatic, normalized),
so the contribution stays within C. Rounding relative to the norm itself is left out, as on the
vmap path. From the norm alone, the factors of rules that scale up scaled the rounding up too
(contributions of 1.43·C in float32, tests/ghost_test.py).

A module class of one's own joins by defining `ghost_grads(self, inputs, output_grads) ->
{param name: per-example gradients [m, *param.shape], or a factored term}`, which ghost calls
bound to the module's params (`self.variables`); dpjax's ViT `TokenEmbedding` does (class token,
position embedding). A factored term is a pytree with the methods of `Term` (its norms, its
weighted sum, its instantiated gradients); the WRN's weight-standardised `WSConv` returns one
(`wrn.StandardizedConvTerm`: the used kernel's gradient from the input patches, `conv_patches`,
pulled back through the standardisation once, after the weighted sum). A subclass that does not
define `ghost_grads` again is not trusted.
Parameters no supported layer owns (custom layers without `ghost_grads`, a layer
called twice per example or read by another of its methods, such as an embedding tied to the
output through `nn.Embed.attend`, a scan over more than one axis) fall back to per-example
gradients by `vmap(grad)` restricted to those parameters (fallback="vmap"), or raise
`GhostUnsupportedError` (fallback="error"). They are never silently left out of the norm: every
trainable leaf is accounted for by exactly one layer record or by the fallback (checked at trace
time), and supported layers are matched by exact type, so a subclass with extra behaviour is
treated as unsupported.

Privacy: the clip rules of the vmap path (flat, automatic and normalized; per group for per-layer
`GroupClip`), each example's factor computed from an upper bound on its contribution's norm
(above), which exceeds the vmap norm by rounding bounds only (tests/ghost_test.py); the sum's
sensitivity is rule.sensitivity. This assumes that the batched forward pass keeps examples apart
(the vmap path runs each example alone): `check_examples_independent` refuses a model that mixes
them, such as one that subtracts a batch mean (the trainer runs it on a synthetic batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.privacy import clipping

PyTree = Any
# batch_losses(params, batch [m, ...]) -> losses [m]; batch_losses(params, batch, ghost_variables)
# -> (losses [m], mutated variables): the model applied to {"params": params, **ghost_variables}
# with mutable=COLLECTIONS (`apply_model` does that part).
BatchLosses = Callable[..., Any]
SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm, nn.GroupNorm)
PROBES = "ghost_probes"  # zeros added to each supported layer's output: their gradient is gᵢ
INPUTS = "ghost_inputs"  # each supported layer's input aᵢ, sown
COLLECTIONS = (PROBES, INPUTS)


def apply_model(model: nn.Module, params: PyTree, inputs: Any,
                ghost_variables: dict | None = None) -> Any:
  """model.apply for a BatchLosses: outputs, or (outputs, mutated variables) when ghost clipping
  passes its `ghost_variables` (a module scanned with nn.scan must stack every collection along
  its axis: `variable_axes={True: 0}`, as dpjax's ViT does)."""
  if ghost_variables is None:
    return model.apply({"params": params}, inputs)
  return model.apply({"params": params, **ghost_variables}, inputs, mutable=list(COLLECTIONS))


class GhostUnsupportedError(ValueError):
  """Ghost clipping cannot compute the per-example norm of some parameters."""


@dataclasses.dataclass(frozen=True)
class _Layer:
  """A supported layer call, as seen at trace time."""
  module: nn.Module  # an unbound clone (its attributes only)
  path: tuple[str, ...]
  param_names: frozenset
  shapes: dict  # {param name: its shape in one call} (under nn.scan: one slice of the stack)


def _is_supported(module_type: type) -> bool:
  """A supported flax layer (exact type), or a module class that defines `ghost_grads` itself."""
  return module_type in SUPPORTED or "ghost_grads" in vars(module_type)


def _layer_param_names(module: nn.Module) -> set[str] | None:
  """The param names ghost computes for `module`, or None if this configuration is unsupported."""
  if "ghost_grads" in vars(type(module)):
    return set(module.variables.get("params", {}))
  if isinstance(module, nn.Embed):
    return {"embedding"}
  if isinstance(module, nn.Conv):
    if (len(module.kernel_size) != 2 or module.feature_group_count != 1
        or module.mask is not None or (isinstance(module.padding, str)
                                       and module.padding.upper() not in ("SAME", "VALID"))):
      return None
    return {"kernel", "bias"} if module.use_bias else {"kernel"}
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    if isinstance(module, nn.DenseGeneral) and module.batch_dims:
      return None
    return {"kernel", "bias"} if module.use_bias else {"kernel"}
  if isinstance(module, nn.LayerNorm) and (_axes(module.reduction_axes) != (-1,)
                                           or _axes(module.feature_axes) != (-1,)):
    return None
  if isinstance(module, nn.GroupNorm) and module.reduction_axes is not None:
    return None
  return ({"scale"} if module.use_scale else set()) | ({"bias"} if module.use_bias else set())


def _axes(axes) -> tuple[int, ...]:
  return (axes,) if isinstance(axes, int) else tuple(axes)


def _intercepting(batch_losses: BatchLosses, layers: dict) -> Callable:
  """(params, batch, probes) -> (losses [m], {path: (inputs, ...) per call}): batch_losses with
  every supported layer call (exact type match) recorded in `layers` (path -> _Layer, first call),
  its input sown into COLLECTIONS' INPUTS and a probe (PROBES, zeros if absent) added to its
  output. Inside `nn.scan` both collections stack along the scanned axis."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not _is_supported(type(module)):
      return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      if context.method_name != "setup" and not context.method_name.startswith("_"):
        # Another method reads the layer's params (nn.Embed.attend: tied weights): its gradient
        # is not in the call's factored term, so the layer's params go to the fallback.
        layers[tuple(module.path)] = _Layer(module.clone(parent=None), tuple(module.path),
                                            frozenset(), {})
      return next_fun(*args, **kwargs)
    outputs = next_fun(*args, **kwargs)
    own = module.variables.get("params", {})
    if tuple(module.path) not in layers:
      names = _layer_param_names(module)
      layers[tuple(module.path)] = _Layer(
          module.clone(parent=None), tuple(module.path),
          frozenset(own) if names is not None and set(own) == names else frozenset(),
          {name: tuple(jnp.shape(value)) for name, value in own.items()})
    module.sow(INPUTS, "inputs", args[0] if args else kwargs["inputs"])
    return module.perturb("probe", outputs, collection=PROBES)

  def losses(params, batch, probes):
    with nn.intercept_methods(interceptor):
      found = batch_losses(params, batch, {} if probes is None else {PROBES: probes})
    if layers and not (isinstance(found, tuple) and len(found) == 2 and INPUTS in found[1]):
      raise GhostUnsupportedError(
          "batch_losses(params, batch, ghost_variables) must apply the model to "
          "{'params': params, **ghost_variables} with mutable=ghost.COLLECTIONS and return "
          "(losses, mutated variables) (see `ghost.apply_model`); it returned no sown layer "
          "inputs.")
    return found[0], {name: found[1].get(name, {}) for name in COLLECTIONS}
  return losses


def _layer_calls(batch_losses: BatchLosses, params: PyTree, batch: PyTree):
  """({path: _Layer}, {path: probe ShapeDtypeStruct}, {path: number of calls}), from an abstract
  forward pass. Under nn.scan the probe shapes carry the scanned axis in front."""
  layers: dict = {}
  _, mutated = jax.eval_shape(_intercepting(batch_losses, layers), params, batch, None)
  flat = lambda tree, leaf: {path[:-1]: value for path, value in _flat_paths(tree, leaf).items()}
  probes = flat(mutated[PROBES], "probe")
  calls = {path: len(value) for path, value in flat(mutated[INPUTS], "inputs").items()}
  return layers, probes, calls


def _flat_paths(tree: dict, leaf: str) -> dict:
  """{(module path..., leaf): value} of a nested variables dict, stopping at `leaf`."""
  found = {}
  for name, value in tree.items():
    if name == leaf:
      found[(leaf,)] = value
    elif isinstance(value, dict):
      found.update({(name,) + path: v for path, v in _flat_paths(value, leaf).items()})
  return found


# ------------------------------------------------------------------------------------------------
# Each parameter's per-example gradient, as a factored term built from (inputs, output grads):
#   _Outer(a [m, T, d], g [m, T, p]): ∇ᵢ = Σₜ aᵢₜ gᵢₜᵀ (a kernel; never instantiated per example),
#   _Summed(h [m, p]):                ∇ᵢ = hᵢ (biases, norm scales: small, instantiated in float32),
#   _Lookup(idx [m, T], g [m, T, d]): ∇ᵢ = Σₜ e_{idxᵢₜ} gᵢₜᵀ (an embedding table's rows).


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Outer:
  """A kernel's term. Its weighted sum scales the narrower factor by wᵢ; on a tie, a if
  `scale_inputs`: the factor that needs no transpose (`_layer_terms` decides)."""
  a: jax.Array
  g: jax.Array
  scale_inputs: bool = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Summed:
  h: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Lookup:
  """An embedding table's term: rows idx [m, T] (in range) looked up, output grads g [m, T, d]:
  ∇ᵢ = Σₜ e_{idxₜ} gₜᵀ, whose squared norm is Σₜ,ₛ [idxₜ = idxₛ] (gₜ·gₛ)."""
  idx: jax.Array
  g: jax.Array
  rows: int = dataclasses.field(metadata=dict(static=True))


class NormBound(NamedTuple):
  """One param leaf's per-example squared norms and the bounds on their rounding, each [m]
  (float32; `per_example_terms`' terms give one each, `Term.norm_bound`).

  ∇ᵢ is the per-example gradient in real arithmetic of the arrays ghost holds (a kernel's
  Σₜ aᵢₜgᵢₜᵀ, from the layer's inputs and output gradients as computed, in their dtype):
    sq: ‖∇ᵢ‖² as computed: what the statistics report.
    sq_error: ≥ |sq − ‖∇ᵢ‖²|, the float32 rounding in computing sq where it is relative to the
      example's per-position terms (for a kernel, Σₜ‖aₜ‖‖gₜ‖), which cancellation between
      positions can make arbitrarily larger than ‖∇ᵢ‖. Rounding relative to ‖∇ᵢ‖ itself (a sum
      of squares) is left out, as the vmap path leaves it out: it moves a contribution by a
      factor 1 + O(k·2⁻²⁴) on both paths.
    slack: ≥ ‖cᵢ/wᵢ − ∇ᵢ‖ for every weight wᵢ > 0, cᵢ being what `weighted_sum(w, real)` adds for
      example i alone: the scaled factor wᵢ·x rounded to its dtype, and the float32 accumulation
      over the example's own positions (the accumulation across examples is the rounding of the
      released sum, as of any sum).
  Hence ‖cᵢ‖ ≤ wᵢ·`upper()` (`clipped_grad_sum` computes wᵢ from it).
  """
  sq: jax.Array
  sq_error: jax.Array
  slack: jax.Array

  def upper(self) -> jax.Array:
    """√(sq + sq_error) + slack ≥ ‖cᵢ‖/wᵢ [m]. Non-finite where any of the example's arrays is
    (the slack is a multiple of Σₜ‖aₜ‖‖gₜ‖, or sq is the sum of squares of the gradients)."""
    return jnp.sqrt(self.sq + self.sq_error) + self.slack


class Term(Protocol):
  """A param's per-example gradients in a factored form of a module's own (from its
  `ghost_grads`; a pytree: under nn.scan, ghost vmaps these methods over the scanned axis)."""

  def norm_bound(self) -> NormBound:
    """The squared norms [m] of exactly the per-example gradients whose weighted sum
    `weighted_sum` forms, with bounds on the rounding in them and in that sum (`NormBound`;
    `gram_norm_bound` and `rounding_slack` give a kernel's)."""

  def weighted_sum(self, weights: jax.Array, real: jax.Array) -> jax.Array:
    """Σᵢ wᵢ·∇ᵢ over the rows where `real`, float32, flattened in the param's order. Rows that
    are not real may hold non-finite values: zero them with `where` (0·inf is NaN), as
    `outer_sum` does."""

  def instantiate(self) -> jax.Array:
    """The per-example gradients [m, size], float32, flattened in the param's order."""


def _is_term(value) -> bool:
  return all(hasattr(value, name) for name in ("norm_bound", "weighted_sum", "instantiate"))


def _rows(x: jax.Array, features: int) -> jax.Array:
  """[m, ..., features] -> [m, T, features], dtype kept (matmuls accumulate in float32)."""
  return x.reshape(x.shape[0], -1, features)


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  """einsum accumulating in float32; float32 operands at full precision (no TF32 rounding, which
  would let a clipped contribution exceed its bound)."""
  full = all(x.dtype == jnp.float32 for x in operands)
  return jnp.einsum(spec, *operands, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST if full else None)


# ------------------------------------------------------------------------------------------------
# Rounding bounds. A float32 sum of k products (a dot product of length k), in any order of
# summation, is within γₖ·Σ|products| of its exact value (Higham, Accuracy and Stability of
# Numerical Algorithms, §3.1), with γₖ = kε/(1 − kε). ε = 2⁻²³ is twice float32's unit roundoff,
# which also covers accumulators that truncate instead of rounding.

EPS32 = float(jnp.finfo(jnp.float32).eps)


def gamma(k: int) -> float:
  """γₖ for float32 (see above); inf where kε ≥ 1 (no bound: the example is then dropped)."""
  k_eps = k * EPS32
  return k_eps / (1.0 - k_eps) if k_eps < 1.0 else math.inf


def inflation(*ks: int) -> float:
  """Π 1/(1 − γₖ) ≥ 1: turns a computed sum of k non-negative terms (or a norm computed from a
  sum of k squares) into an upper bound of the exact one; inf where some γₖ ≥ 1."""
  factor = 1.0
  for k in ks:
    factor = factor / (1.0 - gamma(k)) if gamma(k) < 1.0 else math.inf
  return factor


def _sum_twice(x: jax.Array) -> jax.Array:
  """Σ over the last two axes [..., T, S] -> [...], as a sum over S then one over T: its error is
  within γ_S + γ_T (γ_{S+T}) of Σ|x| rather than γ_{ST}; the barrier keeps XLA from merging the two
  sums into one of unknown order."""
  return jnp.sum(jax.lax.optimization_barrier(jnp.sum(x, axis=-1)), axis=-1)


def magnitude(a: jax.Array, g: jax.Array) -> jax.Array:
  """Sᵢ ≥ Σₜ‖aᵢₜ‖‖gᵢₜ‖ [m] (float32) for a [m, T, d], g [m, T, p]: the size of a kernel term's
  per-position parts, which the rounding in its weighted sum is relative to."""
  norms = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))
  widen = inflation(a.shape[-1] + 2, g.shape[-1] + 2, a.shape[1] + 2)
  return widen * jnp.sum(norms(a) * norms(g), axis=1)


def rounding_slack(a: jax.Array, g: jax.Array) -> jax.Array:
  """(ε + γ_T)·Sᵢ [m] (`magnitude`; ε the eps of g's dtype): a bound per unit wᵢ on how far
  `outer_sum` moves example i's part Σₜ aₜgₜᵀ. Rounding wᵢ·x to g's dtype moves each position's
  term by at most (ε/2)·wᵢ‖aₜ‖‖gₜ‖; accumulating the example's T positions in float32 adds at
  most γ_T(1 + ε/2)·wᵢSᵢ, and the other half of ε covers the (1 + ε/2)."""
  return (float(jnp.finfo(g.dtype).eps) + gamma(a.shape[1])) * magnitude(a, g)


def gram_norm_bound(gram_a: jax.Array, gram_g: jax.Array, gamma_a, gamma_g,
                    scaled_eps: float) -> NormBound:
  """`NormBound` [..., m] of ∇ = Σₜ aₜgₜᵀ from the Grams [..., m, T, T] of a and g (float32).

  gamma_a, gamma_g: bounds γ_d, γ_p (`gamma` of the feature widths d and p: the Grams' dot
    products) with |Âₜₛ − Aₜₛ| ≤ γ_d‖aₜ‖‖aₛ‖ and |Ĝₜₛ − Gₜₛ| ≤ γ_p‖gₜ‖‖gₛ‖; floats, or arrays
    broadcastable to [..., m] (one per layer of a stack). 0.0 for an exact Gram.
  scaled_eps: the eps of the dtype the weighted sum rounds wᵢ·(scaled factor) to.

  sq = Σₜ,ₛ ÂₜₛĜₜₛ (clamped at 0; `_sum_twice`) against ‖∇‖² = Σₜ,ₛ AₜₛGₜₛ:
    |sq − ‖∇‖²| ≤ γ_{2T}·Σ|ÂĜ| + Σ|Â − A||Ĝ| + Σ|A||Ĝ − G|
               ≤ M·(γ_{2T}·Σ|ÂĜ| + γ_d·Σ âₜâₛ|Ĝₜₛ| + γ_p·Σ |Âₜₛ|ĝₜĝₛ + γ_dγ_p·Ŝ²) = sq_error,
  where âₜ = √Âₜₜ (so ‖aₜ‖ ≤ âₜ/√(1 − γ_d)), ĝₜ likewise, Ŝ = Σₜ âₜĝₜ, and
  M = 1/((1 − γ_d)(1 − γ_p)(1 − γ_{2T+12})) also covers the rounding in computing the bound (its
  square roots, products and sums). slack = (scaled_eps + γ_T)·M·Ŝ, as `rounding_slack`.
  """
  t = gram_a.shape[-1]
  gamma_a = jnp.asarray(gamma_a, jnp.float32)
  gamma_g = jnp.asarray(gamma_g, jnp.float32)
  widen = jnp.where((gamma_a < 1.0) & (gamma_g < 1.0),
                    inflation(2 * t + 12) / ((1.0 - gamma_a) * (1.0 - gamma_g)), jnp.inf)
  a_norms = jnp.sqrt(jnp.diagonal(gram_a, axis1=-2, axis2=-1))  # âₜ [..., m, T]
  g_norms = jnp.sqrt(jnp.diagonal(gram_g, axis1=-2, axis2=-1))
  outer = lambda v: v[..., :, None] * v[..., None, :]
  product = gram_a * gram_g
  sq = jnp.maximum(_sum_twice(product), 0.0)
  terms = (gamma(2 * t) * jnp.abs(product)
           + gamma_a[..., None, None] * outer(a_norms) * jnp.abs(gram_g)
           + gamma_g[..., None, None] * jnp.abs(gram_a) * outer(g_norms))
  s = jnp.sum(a_norms * g_norms, axis=-1)
  sq_error = widen * (_sum_twice(terms) + gamma_a * gamma_g * jnp.square(s))
  return NormBound(sq, sq_error, widen * (scaled_eps + gamma(t)) * s)


def summed_bound(h: jax.Array) -> NormBound:
  """`NormBound` of instantiated per-example gradients h [..., m, k] (float32) that the weighted
  sum reads as they are: sq = Σ h², no sq_error (relative to ‖hᵢ‖: left out, as on the vmap
  path), and slack ε₃₂·‖hᵢ‖ for rounding wᵢ·h to float32 (half of it would do)."""
  sq = jnp.sum(jnp.square(h), axis=-1)
  return NormBound(sq, jnp.zeros_like(sq), EPS32 * inflation(h.shape[-1]) * jnp.sqrt(sq))


def _norm_bound(term) -> NormBound:
  """The term's `NormBound`. For a kernel term, the norm is the ghost norm (`gram_norm_bound`) or
  that of the instantiated gradient, whichever is cheaper."""
  if _is_term(term):
    return term.norm_bound()
  if isinstance(term, _Summed):
    return summed_bound(term.h)
  if isinstance(term, _Lookup):  # the Gram of the one-hot rows is [idxₜ = idxₛ], exact
    same = (term.idx[:, :, None] == term.idx[:, None, :]).astype(jnp.float32)
    return gram_norm_bound(same, _gram(term.g), 0.0, gamma(term.g.shape[-1]), EPS32)
  if ghost_norm_is_cheaper(*term.a.shape[1:], term.g.shape[-1]):
    return gram_norm_bound(_gram(term.a), _gram(term.g), gamma(term.a.shape[-1]),
                           gamma(term.g.shape[-1]), float(jnp.finfo(term.g.dtype).eps))
  return instantiated_bound(per_example_outer(term.a, term.g), term.a, term.g)


def instantiated_bound(h: jax.Array, a: jax.Array, g: jax.Array) -> NormBound:
  """`NormBound` of a kernel term from its instantiated gradients h = Σₜ aₜgₜᵀ [m, d, p] as
  computed (`per_example_outer`): entrywise within γ_T·Σₜ|aₜⱼ||gₜₖ| of ∇, so within γ_T·Sᵢ in
  norm (`magnitude`), a linear error that joins `rounding_slack` in the slack."""
  sq = jnp.sum(jnp.square(h), axis=(1, 2))
  slack = rounding_slack(a, g) + gamma(a.shape[1]) * magnitude(a, g)
  return NormBound(sq, jnp.zeros_like(sq), slack)


def ghost_norm_is_cheaper(positions: int, d: int, p: int) -> bool:
  """fastDP's rule for a kernel's per-example norm over T positions (inputs of width d, outputs of
  width p): the ghost norm costs T²(d + p) per example, the instantiated gradient T·d·p."""
  return positions * positions * (d + p) <= positions * d * p


def _gram(x: jax.Array) -> jax.Array:
  """[m, T, k] -> the per-example Gram matrices [m, T, T] (xₜ·xₛ), float32."""
  return _einsum("mtk,msk->mts", x, x)


def _sq_norms_of_terms(terms: dict) -> dict:
  """{leaf path: `NormBound` [m]} for `_per_example_terms`' terms.

  The leaves' reductions to [m] are batched. The Gram products of the kernels whose ghost norm
  is used (outside nn.scan) are stacked by Gram shape and output-gradient dtype, the rows of the
  `_Summed` terms (biases, norms' scales) by shape, and each stack is reduced at once: XLA fuses
  the stack into the reduction, one kernel per shape instead of one or two per leaf (on an H200 a
  CIFAR-sized ViT's step launched ~140 of them; `benchmarks/results/README.md`). The Grams
  themselves stay one matmul per distinct array (q, k and v share their input's): stacking the
  layers' inputs to batch those matmuls copies the inputs and was slower. The norms are the same.
  A Gram stack holds at most `MAX_GRAMS_PER_STACK` distinct Grams: XLA's GPU fusion passes cap a
  fusion at 96 operands and outputs together (`MaxOperandsAndOutputsPerFusion`), so a ViT-B/16's
  single stack of 72 products (120 Grams) was not fused but copied (a 2.9 GB concatenation and a
  slower reduction, ~3.5 ms of a 59 ms step on an H200), where the CIFAR ViT's 60 were fused.
  """
  found, kernels, rows, grams = {}, {}, {}, {}

  def gram(x):  # by identity: an input that several layers read gets one Gram
    if id(x) not in grams:
      grams[id(x)] = _gram(x)
    return grams[id(x)]

  for path, (_, term, stacked) in terms.items():
    if stacked:
      found[path] = _term_norm_bound(term, stacked)
    elif isinstance(term, _Summed):
      rows.setdefault(term.h.shape, []).append((path, term.h))
    elif (isinstance(term, _Outer)
          and ghost_norm_is_cheaper(*term.a.shape[1:], term.g.shape[-1])):
      kernels.setdefault((term.a.shape[:2], term.g.dtype), []).append(
          (path, gram(term.a), gram(term.g), term.a.shape[-1], term.g.shape[-1]))
    else:
      found[path] = _norm_bound(term)
  for (_, g_dtype), members in kernels.items():
    for chunk in _within_gram_cap(members):
      widths = lambda k: jnp.asarray([[gamma(member[k])] for member in chunk], jnp.float32)
      bound = gram_norm_bound(jnp.stack([a for _, a, _, _, _ in chunk]),
                              jnp.stack([g for _, _, g, _, _ in chunk]), widths(3), widths(4),
                              float(jnp.finfo(g_dtype).eps))
      found.update({member[0]: NormBound(*(x[k] for x in bound))
                    for k, member in enumerate(chunk)})
  for members in rows.values():
    bound = summed_bound(jnp.stack([h for _, h in members]))
    found.update({path: NormBound(*(x[k] for x in bound)) for k, (path, _) in enumerate(members)})
  return {path: found[path] for path in terms}


MAX_GRAMS_PER_STACK = 48  # half XLA GPU's 96 operands + outputs per fusion: room for the rest


def _within_gram_cap(members: list) -> list[list]:
  """[(path, gram_a, gram_g, ...), ...] split, in order, into runs that read at most
  `MAX_GRAMS_PER_STACK` distinct Gram arrays each (a Gram several layers share counts once)."""
  chunks, distinct = [[]], set()
  for member in members:
    new = {id(member[1]), id(member[2])} - distinct
    if chunks[-1] and len(distinct) + len(new) > MAX_GRAMS_PER_STACK:
      chunks.append([])
      distinct, new = set(), {id(member[1]), id(member[2])}
    chunks[-1].append(member)
    distinct |= new
  return chunks


def per_example_outer(a: jax.Array, g: jax.Array) -> jax.Array:
  """Σₜ aᵢₜ gᵢₜᵀ [m, d, p], float32, for a [m, T, d], g [m, T, p]: instantiated kernel
  gradients (one batched matmul)."""
  return _einsum("mtd,mtp->mdp", a, g)


def outer_sum(a: jax.Array, g: jax.Array, weights: jax.Array, real: jax.Array,
              scale_inputs: bool = False) -> jax.Array:
  """Σᵢ wᵢ Σₜ aᵢₜ gᵢₜᵀ [d, p] (float32 accumulation) over the rows where `real`, for
  a [m, T, d], g [m, T, p], weights [m]: one matmul, with the narrower factor scaled by wᵢ and
  rounded back to g's dtype (on a tie d = p, a if `scale_inputs`; `rounding_slack` bounds what
  that moves). Both factors' other rows are replaced by zeros (`where`): a row that is not real
  may hold inf or NaN (an example ghost dropped as non-finite), and 0·inf is NaN."""
  keep = lambda x: jnp.where(real[:, None, None], x, jnp.zeros((), x.dtype))
  scaled = lambda x: keep(weights[:, None, None] * x.astype(jnp.float32)).astype(g.dtype)
  d, p = a.shape[-1], g.shape[-1]
  if d < p or (d == p and scale_inputs):
    return _einsum("mtd,mtp->dp", scaled(a), keep(g))
  return _einsum("mtd,mtp->dp", keep(a), scaled(g))


def _weighted_sum(term, weights: jax.Array, real: jax.Array) -> jax.Array:
  """Σᵢ wᵢ·∇ᵢ over the real rows, in float32 ([d, p] for a kernel term (`outer_sum`), [p] or
  flattened otherwise)."""
  if _is_term(term):
    return term.weighted_sum(weights, real)
  if isinstance(term, _Summed):  # a matrix-vector product over the row axis
    weights, real = _unshared(weights, real)
    return _einsum("m,mk->k", weights, jnp.where(real[:, None], term.h, 0.0))
  if isinstance(term, _Lookup):  # each example's scaled output grads added into their rows
    g = jnp.where(real[:, None, None], term.g.astype(jnp.float32), 0.0) * weights[:, None, None]
    features = g.shape[-1]
    return jnp.zeros((term.rows, features), jnp.float32).at[term.idx.reshape(-1)].add(
        g.reshape(-1, features))
  return outer_sum(term.a, term.g, weights, real, term.scale_inputs)


def _unshared(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The arrays behind an optimization barrier, for a reduction that reads them: otherwise XLA
  merges it with every other layer's elementwise use of the weights into one multi-output
  fusion, which then runs at the reduction's pace (2.3 ms of a 64 ms ViT-B/16 step on an H200:
  `benchmarks/results/README.md`)."""
  return jax.lax.optimization_barrier(arrays)


def _pair(value) -> tuple[int, int]:
  value = value or 1
  return (value,) * 2 if isinstance(value, int) else tuple(value)


def _conv_padding(module: nn.Conv):
  """The conv's padding as "SAME", "VALID" or [(low, high)] * 2."""
  padding = module.padding
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _channels_first(module: nn.Conv) -> bool:
  """Whether the conv's patches are in (C, kh, kw) order (input dilation: patches from
  `conv_general_dilated_patches`) rather than (kh, kw, C)."""
  return _pair(module.input_dilation) != (1, 1)


def conv_patches(x: jax.Array, kernel_size: tuple[int, int], strides=1, padding="VALID",
                 kernel_dilation=1) -> jax.Array:
  """A 2-D conv's input patches [m, H', W', kh·kw·C] in (kh, kw, C) order (the order of an HWIO
  kernel reshaped to [kh·kw·C, O]: patches @ kernel is the conv), for x [m, H, W, C] and the
  conv's strides, padding ("SAME", "VALID" or [(low, high)] * 2) and kernel dilation.

  No identity-kernel convolution (9·C output channels for a 3×3 conv, ~9× the layer's own
  FLOPs): a reshape when the windows tile the input (stride = kernel, no padding or dilation: a
  ViT's patch embedding), else kh·kw strided slices of the padded input."""
  (kh, kw), (sh, sw), (dh, dw) = kernel_size, _pair(strides), _pair(kernel_dilation)
  if isinstance(padding, str):  # as lax.conv_general_dilated pads: for the dilated kernel
    padding = jax.lax.padtype_to_pads(x.shape[1:3], ((kh - 1) * dh + 1, (kw - 1) * dw + 1),
                                      (sh, sw), padding.upper())
  m, h, w, c = x.shape
  if (sh, sw) == (kh, kw) and (dh, dw) == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
    rows, cols = h // kh, w // kw  # VALID drops the remainder
    x = x[:, :rows * kh, :cols * kw].reshape(m, rows, kh, cols, kw, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(m, rows, cols, kh * kw * c)
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  [(0, 0, 0)] + [(low, high, 0) for low, high in padding] + [(0, 0, 0)])
  m, h, w, c = x.shape
  rows, cols = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
  windows = [jax.lax.slice(x, (0, i * dh, j * dw, 0),
                           (m, i * dh + (rows - 1) * sh + 1, j * dw + (cols - 1) * sw + 1, c),
                           (1, sh, sw, 1))
             for i in range(kh) for j in range(kw)]
  return jnp.stack(windows, axis=3).reshape(m, rows, cols, kh * kw * c)


def _conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
  """An nn.Conv's input patches: `conv_patches`, or under input dilation those of
  `conv_general_dilated_patches`, in (C, kh, kw) order (`_channels_first`)."""
  if not _channels_first(module):
    return conv_patches(x, tuple(module.kernel_size), module.strides, _conv_padding(module),
                        module.kernel_dilation)
  return jax.lax.conv_general_dilated_patches(
      x, tuple(module.kernel_size), _pair(module.strides), _conv_padding(module),
      lhs_dilation=_pair(module.input_dilation), rhs_dilation=_pair(module.kernel_dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _lookup_term(module: nn.Embed, indices: jax.Array, g: jax.Array) -> _Lookup:
  """The embedding's term, with the rows `jnp.take` reads: negative indices wrap, out-of-range
  ones read no row (no gradient), and a one-row table is broadcast whatever the index."""
  rows = module.num_embeddings
  idx = indices.reshape(indices.shape[0], -1)
  idx = jnp.zeros_like(idx) if rows == 1 else jnp.where(idx < 0, idx + rows, idx)
  g = _rows(g, g.shape[-1])
  g = jnp.where(((idx >= 0) & (idx < rows))[:, :, None], g, jnp.zeros((), g.dtype))
  return _Lookup(idx, g, rows)


def _normalized(module: nn.Module, x: jax.Array) -> jax.Array:
  """x̂: the norm layer's output with scale 1 and bias 0."""
  plain = module.clone(use_scale=False, use_bias=False, parent=None)
  return plain.apply({}, x).astype(jnp.float32)


def _layer_terms(layer: _Layer, x: jax.Array, g: jax.Array, trainable: dict,
                 params: dict) -> dict:
  """{param name: its per-example gradient as a factored term} for the layer's trainable params
  (`params`: the layer's own, one slice of a scanned stack)."""
  module, terms = layer.module, {}
  if "ghost_grads" in vars(type(module)):  # called bound to its params
    grads = module.apply({"params": params}, x, g, method=type(module).ghost_grads)
    wanted = [name for name in layer.param_names if trainable.get(name)]
    missing = [name for name in wanted if name not in grads]
    if missing:
      raise GhostUnsupportedError(
          f"{type(module).__name__}.ghost_grads ({'/'.join(layer.path)}) returned nothing for "
          f"{missing}: it must return per-example gradients [m, *shape] or a `ghost.Term` for "
          "every param of the module.")
    as_term = lambda grad: (grad if _is_term(grad) else
                            _Summed(grad.reshape(g.shape[0], -1).astype(jnp.float32)))
    return {name: as_term(grads[name]) for name in wanted}
  if isinstance(module, nn.Embed):
    return {"embedding": _lookup_term(module, x, g)} if trainable.get("embedding") else {}
  if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
    gf = _rows(g, g.shape[-1]).astype(jnp.float32)
    if trainable.get("scale"):
      terms["scale"] = _Summed(jnp.sum(gf * _rows(_normalized(module, x), g.shape[-1]), 1))
    if trainable.get("bias"):
      terms["bias"] = _Summed(jnp.sum(gf, 1))
    return terms
  if isinstance(module, nn.Conv):
    a = _conv_patches(module, x.astype(g.dtype))
    a, gf = _rows(a, a.shape[-1]), _rows(g, g.shape[-1])
    scale_inputs = False  # patches are gathered from the input (slices, a transpose)
  else:
    axes = _axes(module.axis) if isinstance(module, nn.DenseGeneral) else (-1,)
    contracted = len(axes)
    if sorted(a % x.ndim for a in axes) != list(range(x.ndim - contracted, x.ndim)):
      raise GhostUnsupportedError(f"{'/'.join(layer.path)}: DenseGeneral over non-trailing axes.")
    d = math.prod(x.shape[x.ndim - contracted:])
    out_features = math.prod(g.shape[x.ndim - contracted:])
    a, gf = _rows(x.astype(g.dtype), d), _rows(g, out_features)
    # Features over several axes (attention heads) come out of, or go into, per-head matmuls
    # whose layout XLA keeps head-major: scaling that factor would add a transpose.
    scale_inputs = contracted == 1 or g.ndim - (x.ndim - contracted) > 1
  if trainable.get("kernel"):
    terms["kernel"] = _Outer(a, gf, scale_inputs)
  if trainable.get("bias"):
    terms["bias"] = _Summed(jnp.sum(gf.astype(jnp.float32), 1))
  return terms


def _masked(module: nn.Module | None, name: str, term, mask: jax.Array) -> _Summed:
  """The term's per-example gradients instantiated [m, size] (float32) times the element mask
  M [*shape] (one slice of a scanned stack), flattened in the order `_as_param` reads: an element
  mask breaks a kernel's outer-product form, so its norm cannot be a ghost norm."""
  if _is_term(term):
    h = term.instantiate()
  elif isinstance(term, _Outer):
    h = per_example_outer(term.a, term.g)
  elif isinstance(term, _Lookup):
    h = jax.vmap(lambda idx, g: jnp.zeros((term.rows, g.shape[-1]), jnp.float32).at[idx].add(
        g.astype(jnp.float32)))(term.idx, term.g)
  else:
    h = term.h
  if isinstance(module, nn.Conv) and name == "kernel" and _channels_first(module):
    mask = mask.transpose(2, 0, 1, 3)  # (kh, kw, C, O) -> the patches' (C, kh, kw, O)
  return _Summed(h.reshape(h.shape[0], -1) * mask.reshape(1, -1).astype(jnp.float32))


def _row_sums(terms: dict, weights: dict, real: jax.Array) -> dict:
  """{leaf path: Σᵢ wᵢ·hᵢ [width], float32} over the real rows, for the `_Summed` terms outside
  nn.scan (biases, norms' scales), stacked by shape: one matrix-vector product per shape instead
  of one per leaf (`_sq_norms_of_terms` batches their norms likewise)."""
  by_shape: dict[tuple, list] = {}
  for path, (_, term, stacked) in terms.items():
    if not stacked and isinstance(term, _Summed):
      by_shape.setdefault(term.h.shape, []).append(path)
  found = {}
  for paths in by_shape.values():
    w, r = _unshared(jnp.stack([weights[path] for path in paths]), real)
    h = jnp.stack([terms[path][1].h for path in paths])
    sums = _einsum("lm,lmk->lk", w, jnp.where(r[None, :, None], h, 0.0))
    found.update({path: sums[k] for k, path in enumerate(paths)})
  return found


def _summed_param(found: tuple, name: str, weights: jax.Array, real: jax.Array,
                  shape: tuple[int, ...]) -> jax.Array:
  """Σᵢ wᵢ·∇ᵢ of one param leaf [*shape] from its (module, term, stacked) entry; a stacked term
  is summed slice by slice along its scanned axis (shape[0])."""
  module, term, stacked = found
  if not stacked:
    return _as_param(module, name, _weighted_sum(term, weights, real), shape)
  one = lambda t: _as_param(module, name, _weighted_sum(t, weights, real), shape[1:])
  return jax.vmap(one)(term)


def _as_param(module: nn.Module, name: str, flat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A weighted sum of a layer's terms, in its param's shape (see `_channels_first` for the order
  of conv patches)."""
  if isinstance(module, nn.Conv) and name == "kernel" and _channels_first(module):
    kh, kw, c, o = shape
    return flat.reshape(c, kh, kw, o).transpose(1, 2, 0, 3)
  return flat.reshape(shape)


# ------------------------------------------------------------------------------------------------


def _leaf_paths(tree: PyTree) -> list[tuple[str, ...]]:
  return [clipping.path_to_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _stack_depth(layer: _Layer, params: PyTree) -> int | None:
  """How many leading axes the layer's params carry beyond one call's shapes (0, or 1 under
  nn.scan), or None if they do not match."""
  leaves = _subtree(params, layer.path)
  extra = {len(jnp.shape(leaves[name])) - len(shape) for name, shape in layer.shapes.items()}
  if len(extra) != 1 or not extra <= {0, 1}:
    return None
  depth = extra.pop()
  if any(tuple(jnp.shape(leaves[name]))[depth:] != shape for name, shape in layer.shapes.items()):
    return None
  return depth


def _coverage(layers: dict, calls: dict, params, trainable) -> tuple[dict, PyTree]:
  """({path: stack depth} of the layers whose norms ghost computes, bool pytree of the trainable
  leaves left to the fallback). A module called more than once per example goes to the fallback,
  as do params whose shapes ghost cannot read (a scan over more than one axis)."""
  used = {}
  for path, layer in layers.items():
    depth = _stack_depth(layer, params) if layer.param_names else None
    if depth is not None and calls.get(path) == 1:
      used[path] = depth
  covered = {path + (name,) for path in used for name in layers[path].param_names}
  flags = jax.tree_util.tree_leaves(trainable) if trainable is not None else None
  left = [(flags is None or bool(flags[k])) and path not in covered
          for k, path in enumerate(_leaf_paths(params))]
  return used, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), left)


def _per_example_terms(batch_losses: BatchLosses, params: PyTree, batch: PyTree,
                       trainable: PyTree | None, fallback: str) -> dict:
  """{leaf path: (module, term, stacked)} for every trainable leaf: factored terms for the leaves
  of supported layers (one forward and one backward pass, to the layers' outputs only; under
  nn.scan each term array carries the scanned axis in front and `stacked` is True), and
  per-example gradients ([m, *shape], by vmap(grad)) for the leaves left to the fallback."""
  layers, probe_shapes, calls = _layer_calls(batch_losses, params, batch)
  used, left = _coverage(layers, calls, params, trainable)
  if fallback == "error" and any(jax.tree_util.tree_leaves(left)):
    names = ["/".join(p) for p, keep in zip(_leaf_paths(params), jax.tree_util.tree_leaves(left))
             if keep]
    raise GhostUnsupportedError(
        f"Ghost clipping cannot compute per-example norms for {names}: no supported layer "
        f"({', '.join(t.__name__ for t in SUPPORTED)}) owns them alone. Use fallback='vmap' "
        "(per-example gradients for these parameters only) or perf.per_example_method='vmap'.")
  # Zeros built from the batch, so that under shard_map they vary across devices as the batch
  # does: the gradient w.r.t. a device-invariant probe would be summed over the devices.
  anchor = jnp.zeros_like(jax.tree_util.tree_leaves(batch)[0], jnp.float32).ravel()[:1].sum()
  probes = {}
  for path, shape in probe_shapes.items():
    _subtree(probes, path, create=True)["probe"] = (
        jnp.zeros(shape.shape, jnp.float32) + anchor).astype(shape.dtype)

  def summed_loss(probes):
    losses, mutated = _intercepting(batch_losses, {})(params, batch, probes)
    return jnp.sum(losses), mutated[INPUTS]

  output_grads, inputs = jax.grad(summed_loss, has_aux=True)(probes)
  trainable_flags = (jax.tree_util.tree_map(lambda _: True, params) if trainable is None
                     else trainable)
  terms = {}
  for path, depth in used.items():
    layer = layers[path]
    flags = _subtree(trainable_flags, path)
    flags = {name: bool(flags[name]) for name in layer.param_names}
    terms_of = lambda x, g, own: _layer_terms(layer, x, g, flags, own)
    found = (jax.vmap(terms_of) if depth else terms_of)(
        _subtree(inputs, path)["inputs"][0], _subtree(output_grads, path)["probe"],
        {name: _subtree(params, path)[name] for name in layer.shapes})
    terms.update({path + (name,): (layer.module, term, bool(depth))
                  for name, term in found.items()})
  if any(jax.tree_util.tree_leaves(left)):
    per_example = _fallback_grads(batch_losses, params, batch, left)
    for path, grad in zip(_leaf_paths(per_example), jax.tree_util.tree_leaves(per_example)):
      terms[path] = (None, _Summed(grad.reshape(grad.shape[0], -1).astype(jnp.float32)), False)
  return terms


def _term_norm_bound(term, stacked: bool) -> NormBound:
  """`_norm_bound`, summed over the scanned axis of a stacked term: the slices are orthogonal
  blocks of the param, and by Minkowski's inequality √Σₖ(√(sqₖ + errₖ) + slackₖ)² is at most
  √(Σₖ sqₖ + Σₖ errₖ) + Σₖ slackₖ, so the sums bound the stack's contribution."""
  if not stacked:
    return _norm_bound(term)
  return NormBound(*(jnp.sum(x, axis=0) for x in jax.vmap(_norm_bound)(term)))


def per_example_terms(batch_losses: BatchLosses, params: PyTree, batch: PyTree,
                      trainable: PyTree | None = None, fallback: str = "vmap"
                      ) -> dict[tuple[str, ...], Term]:
  """{leaf path: `Term`} for every trainable leaf: what ghost clipping computes norms and the
  clipped sum from, after its one forward and one backward pass (to the layers' outputs only).
  Leaves of supported layers get factored terms (layer inputs and output gradients, or a module's
  `ghost_grads` term); leaves left to the fallback get per-example gradients. Under nn.scan a
  term's arrays carry the scanned axis in front. Data-dependent: not to be released."""
  return {path: term for path, (_, term, _) in
          _per_example_terms(batch_losses, params, batch, trainable, fallback).items()}


def ghost_sq_norms(batch_losses: BatchLosses, params: PyTree, batch: PyTree,
                   trainable: PyTree | None = None, fallback: str = "vmap") -> jax.Array:
  """Per-example squared L2 norms [m] of ∇ℓᵢ w.r.t. the trainable params, without per-example
  gradients of the supported layers.

  batch_losses(params, batch) -> [m] per-example losses of a batch; examples must not interact
  (`check_examples_independent`).
  """
  terms = _per_example_terms(batch_losses, params, batch, trainable, fallback)
  return sum(bound.sq for bound in _sq_norms_of_terms(terms).values())


class ExamplesMixedError(GhostUnsupportedError):
  """The batched forward pass mixes examples, so ghost's per-example norms are not per-example."""


def check_examples_independent(batch_losses: BatchLosses, params: PyTree, batch: PyTree, *,
                               trainable: PyTree | None = None, fallback: str = "vmap",
                               rtol: float = 1e-3) -> None:
  """Raises `ExamplesMixedError` if changing one example of `batch` changes another's loss or
  ghost norm.

  Ghost clipping takes every example's norm and clipped gradient from one batched forward and
  backward pass; its bound on one example's contribution holds only if example i's loss, layer
  inputs and output gradients depend on example i alone. BatchNorm in training mode, a
  batch-mean subtraction or attention across the batch axis break that silently (and
  `clipping.reject_batch_stats` sees only BatchNorm's statistics). The vmap path is immune: it
  differentiates a loss of each example alone. The check replaces the first example, then the
  last, by another example of the batch and by large random noise (floating leaves; other
  leaves, such as labels, are taken from that other example), and requires the other examples'
  losses and ghost squared norms (`ghost_sq_norms`) to stay within rtol of their size plus four
  times how much two evaluations of `batch` itself differ (non-deterministic reductions on an
  accelerator). A model that keeps examples apart gives the untouched rows bit for bit.

  Args:
    batch_losses: batch_losses(params, batch) -> [n] losses, as `clipped_grad_sum` takes it.
    params: the params (a fresh init is fine: the check reads the model's structure).
    batch: leaves [n ≥ 2, ...] of distinct, non-degenerate examples; synthetic data serves (the
      trainer passes random images, so that no private data steers the check).
    trainable, fallback: as for `clipped_grad_sum`.
  """
  n = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
  if n < 2:
    raise ValueError(f"check_examples_independent needs a batch of at least 2 examples, got {n}.")
  evaluate = jax.jit(lambda p, b: (batch_losses(p, b),
                                   ghost_sq_norms(batch_losses, p, b, trainable, fallback)))
  as_numpy = lambda values: [np.asarray(x, np.float64) for x in values]
  base, again = as_numpy(evaluate(params, batch)), as_numpy(evaluate(params, batch))
  if not all(np.all(np.isfinite(x)) for x in base):
    raise ValueError("check_examples_independent needs finite losses and norms on its batch.")
  for index, other in ((0, 1), (n - 1, n - 2)):
    for what, changed in (("another example", _with_example(batch, index, other, None)),
                          ("random noise", _with_example(batch, index, other, index))):
      for name, got, want, repeat in zip(("losses", "gradient norms"),
                                         as_numpy(evaluate(params, changed)), base, again):
        rows = np.arange(n) != index
        tolerance = (4 * np.max(np.abs(repeat - want))
                     + rtol * (np.abs(want[rows]) + np.mean(np.abs(want))))
        moved = np.abs(got[rows] - want[rows])
        if not np.all(moved <= tolerance):  # NaN included
          raise ExamplesMixedError(
              f"The model mixes the examples of a batch: replacing example {index} by {what} "
              f"changed the {name} of other examples (by up to {np.nanmax(moved):.3g}, or to a "
              "non-finite value), e.g. through batch statistics (BatchNorm in training mode, a "
              "batch-mean subtraction). Ghost clipping computes every example's norm and "
              "clipped gradient from one batched pass, so its bound on one example's "
              "contribution, hence the DP guarantee, does not hold for this model. Use "
              "perf.per_example_method='vmap' (each example's gradient from that example "
              "alone), or a model that treats examples independently (GroupNorm, LayerNorm).")


def _with_example(batch: PyTree, index: int, other: int, noise_seed: int | None) -> PyTree:
  """The batch (as NumPy) with row `index` replaced by row `other`, or, with a noise_seed, its
  floating leaves by random normal values of scale 4·max|leaf| + 1 (its other leaves by row
  `other`)."""
  rng = np.random.default_rng(noise_seed)

  def replace(leaf):
    leaf = np.array(leaf)
    row = leaf[other]
    if noise_seed is not None and np.issubdtype(leaf.dtype, np.floating):
      scale = 4.0 * float(np.max(np.abs(leaf.astype(np.float32)))) + 1.0
      row = (scale * rng.standard_normal(leaf.shape[1:])).astype(leaf.dtype)
    leaf[index] = row
    return leaf
  return jax.tree_util.tree_map(replace, batch)


def _subtree(tree: dict, path: tuple[str, ...], create: bool = False) -> dict:
  for name in path:
    if create:
      tree = tree.setdefault(name, {})
    else:
      tree = tree[name]
  return tree


def _fallback_grads(batch_losses, params, batch, left) -> PyTree:
  """Per-example gradients [m, *shape] w.r.t. the `left` leaves (None elsewhere), by vmap(grad)."""
  mine, rest = clipping.partition(params, left)

  def one(example):
    single = jax.tree_util.tree_map(lambda x: x[None], example)
    return jax.grad(lambda p: batch_losses(clipping.merge(p, rest), single)[0])(mine)
  return jax.vmap(one)(batch)


def _group_factors(rule: clipping.ClipRule) -> Callable[[str, jax.Array], tuple]:
  """(group, norms [m]) -> (factors [m], 1.0 where scaled down): one group of all leaves for rules
  that scale the whole gradient (flat, automatic, normalized), a group per `GroupClip` group."""
  if isinstance(rule, clipping.GroupClip):
    return rule.group_factor
  try:
    rule.factor(jnp.float32(1.0))
  except NotImplementedError as e:
    raise GhostUnsupportedError(
        f"Ghost clipping needs a clip rule that scales the whole gradient or each group of it "
        f"({e}) — flat, automatic, normalized or per-layer (GroupClip); use "
        "perf.per_example_method='vmap'.")
  return lambda name, norm: rule.factor(norm)


def _group_of(rule: clipping.ClipRule, path: tuple[str, ...]) -> str:
  """The clip group of a leaf (its path of names): `GroupClip`'s, or one group for other rules."""
  return rule.group_named(path) if isinstance(rule, clipping.GroupClip) else ""


def _example_weights(rule: clipping.ClipRule, bounds: dict, real: jax.Array) -> tuple:
  """(weights {leaf path: wᵢ [m]}, kept [m], norms [m], clipped [m]) from the leaves'
  `NormBound`s.

  Per clip group, wᵢ = factor(Uᵢ) with Uᵢ = √Σ_leaves upper² ≥ ‖cᵢ‖/wᵢ (the leaves are orthogonal
  blocks), so the group's contribution has norm ≤ factor(Uᵢ)·Uᵢ ≤ its bound C: every rule's factor
  satisfies factor(x)·x ≤ C for all x ≥ 0 (flat: min(1, C/x)·x, automatic: Cx/(x + γ),
  normalized: C, per group likewise), whether it scales down or up. An upper bound, not a lower
  one: a rule's factor(x)·x bounds x only, and for rules that scale up (factor > 1) the rounding of
  the scaled factor grows with it, so the factor must see it. kept: the real rows whose bounds are
  all finite; a row with an inf or NaN anywhere in its terms gets weight 0 and is zeroed in the
  weighted sums, so it adds exactly 0 (and counts as clipped). norms: the computed ‖∇ᵢ‖ (the
  statistics); clipped: 1.0 where the rule scaled the example down at that norm, or dropped it.
  """
  group_factor = _group_factors(rule)
  groups: dict[str, list] = {}  # clip group -> [(leaf path, NormBound), ...]
  for path, bound in bounds.items():
    groups.setdefault(_group_of(rule, path), []).append((path, bound))
  factors, sq_norms, clipped, finite = {}, [], [], jnp.ones(real.shape, bool)
  for name, members in groups.items():
    norm = jnp.sqrt(sum(bound.sq for _, bound in members))
    upper = jnp.sqrt(sum(jnp.square(bound.upper()) for _, bound in members))
    factors[name] = group_factor(name, upper)[0]
    clipped.append(group_factor(name, norm)[1])
    sq_norms.append(jnp.square(norm))
    finite = finite & jnp.isfinite(upper)
  kept = real & finite
  weights = {path: jnp.where(kept, factors[name], 0.0)
             for name, members in groups.items() for path, _ in members}
  dropped = jnp.where(finite, 0.0, 1.0)
  norms = jnp.sqrt(sum(sq_norms, jnp.zeros(real.shape, jnp.float32)))
  return weights, kept, norms, functools.reduce(jnp.maximum, clipped, dropped)


def clipped_grad_sum(batch_losses: BatchLosses, params: PyTree, examples: PyTree,
                     mask: jax.Array, rule: clipping.ClipRule, *,
                     microbatch_size: int | None = None, trainable: PyTree | None = None,
                     fallback: str = "vmap", element_mask: PyTree | None = None
                     ) -> clipping.ClippedSum:
  """Σᵢ maskᵢ·clip(∇ℓᵢ) by ghost clipping with book-keeping; the result of
  `clipping.clipped_grad_sum` (float32) up to the rounding bounds below, without per-example
  gradients or a second backward pass.

  batch_losses(params, batch) -> [m] per-example losses; examples: leaves [n, ...]; mask [n];
  rule: flat, automatic, normalized (one factor per example) or a `GroupClip` (per-layer: one
    factor per example and group, from the group's ghost norm). See the module docstring.
  element_mask: optional pytree like params (0/1): each per-example gradient is M ⊙ ∇ℓᵢ before
    clipping, as `clipping.clipped_grad_sum` of a loss of `finetune.masked_params` (sparse
    fine-tuning). The masked leaves' per-example gradients are instantiated (`_masked`).

  Privacy: the batched forward pass must not mix examples (`check_examples_independent`). Then
  each example's contribution has norm ≤ rule.sensitivity for every rule, in any precision: its
  factor is computed from an upper bound on the norm of what the weighted sums add for it,
  rounding included (`_example_weights`, `NormBound`), not from its computed norm. An example
  whose terms hold an inf or NaN (an inf or NaN input, an overflow) adds exactly zero, as padded
  rows (mask 0) do. The statistics report the computed norms; a non-finite one counts as clipped
  and adds 0 to the norm sum and max.
  """
  clipping.reject_batch_stats(params)
  _group_factors(rule)  # refuses a rule without factors before tracing
  if fallback not in ("vmap", "error"):
    raise ValueError(f"fallback must be 'vmap' or 'error', got {fallback!r}.")
  n = int(mask.shape[0])
  m = n if microbatch_size is None else int(microbatch_size)
  train_p, frozen_p = clipping.partition(params, trainable)

  masks = ({} if element_mask is None else
           dict(zip(_leaf_paths(element_mask), jax.tree_util.tree_leaves(element_mask))))

  def clip_chunk(chunk):
    batch, chunk_mask = chunk
    terms = _per_example_terms(batch_losses, params, batch, trainable, fallback)
    for path, (module, term, stacked) in terms.items():
      if path in masks:
        masked = functools.partial(_masked, module, path[-1])
        terms[path] = (module, (jax.vmap(masked) if stacked else masked)(term, masks[path]),
                       stacked)
    weights, kept, norms, clipped = _example_weights(rule, _sq_norms_of_terms(terms),
                                                     chunk_mask > 0)
    rows = _row_sums(terms, weights, kept)

    def summed_param(key_path, x):
      path = clipping.path_to_names(key_path)
      if path in rows:
        return _as_param(terms[path][0], path[-1], rows[path], x.shape)
      return _summed_param(terms[path], path[-1], weights[path], kept, x.shape)
    summed = jax.tree_util.tree_map_with_path(summed_param, train_p)
    return summed, clipping.microbatch_stats(norms, clipped, chunk_mask > 0)

  return clipping.sum_over_microbatches(clip_chunk, examples, mask, m, frozen_p, rule)
