"""Ghost clipping: per-example gradient norms without per-example gradients (Li et al. 2022).

One microbatch of m examples costs one batched forward and backward pass, as non-private
training does (book-keeping, Bu et al. 2023):
  1. a forward pass in which every supported layer's output gets a zero "probe" added (a flax
     variable of collection PROBES); the gradient of Σᵢ ℓᵢ w.r.t. the probes is each example's
     output gradient gᵢ (rows do not interact: no BatchNorm), and each layer's input aᵢ is sown
     into collection INPUTS. No parameter gradient is formed in this pass. Being flax variables,
     probes and inputs follow `nn.scan` (a scanned stack of blocks, stacked params) and
     `nn.remat`/`jax.checkpoint`: a scanned layer's norms are summed over its slices and its
     clipped sum is formed slice by slice. Each parameter's per-example gradient is then a
     factored term (`terms`):
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

Augmentation multiplicity (`views=K`, De et al. 2022): the loss runs the model on K views of each
example (rows example-major) and returns each example's mean loss over them. Every layer's terms
then have m·K rows, and each example's K rows are merged into one term (`terms.merge_views`): a
kernel's views' positions become the example's positions (Σₖ Σₜ aₖₜgₖₜᵀ over K·T positions), so
the ghost norm is exactly that of the example's mean gradient and its rounding bounds are those
of K·T positions; biases and norm scales add their views' rows. The clip then bounds the mean
gradient, as the vmap path's clip of the mean loss's gradient does.

Precision and the clip bound: matmuls accumulate in float32 (float32 operands at full precision,
no TF32). The norm that picks an example's factor wᵢ and the sum that wᵢ scales are computed
differently (Gram products; one matmul), and both round relative to the example's per-position
terms Σₜ‖aₜ‖‖gₜ‖, which cancellation across positions (tokens, pixels) can make arbitrarily
larger than its norm; wᵢaᵢ or wᵢgᵢ is also rounded to the activations' dtype before the matmul.
So wᵢ is computed, for every rule, from an upper bound Uᵢ on the norm of what the sums add for the
example per unit wᵢ, all of that rounding included (`NormBound`, `example_weights`): every
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

Privacy: the clip rules of the vmap path (any `clipping.ClipRule`, through its `groups` and
`factors` only: one factor per example and clip group), each example's factor computed from an
upper bound on its contribution's norm (above), which exceeds the vmap norm by rounding bounds
only (tests/ghost_test.py); the sum's sensitivity is rule.sensitivity. This assumes that the
batched forward pass keeps examples apart (the vmap path runs each example alone):
`check_examples_independent` refuses a model that mixes them, such as one that subtracts a batch
mean (the trainer runs it on a synthetic batch).

Modules, one job each: `layers` (which layer calls are read: probes, sown inputs, coverage),
`patches` (conv input patches), `terms` (factored terms: norms, weighted sums), `layer_terms`
(each layer's terms; element masks), `collect` (the one forward and backward pass, and the vmap
fallback), `rounding` (rounding bounds, `NormBound`), `norms` (norms in stacks, Gram caps),
`clipped_sum` (weights from the clip rule, the clipped sum), `independence` (the check that the
model keeps examples apart), `example_calls` (ghost clipping of an unchanged per-example loss's
Linen layer calls, for `dpjax.privacy.grad.clipped_grad(per_example_method='ghost')`).
"""

from dpjax.privacy.ghost.clipped_sum import clipped_grad_sum
from dpjax.privacy.ghost.collect import per_example_terms
from dpjax.privacy.ghost.independence import ExamplesMixedError, check_examples_independent
from dpjax.privacy.ghost.layers import (COLLECTIONS, INPUTS, PROBES, SUPPORTED, BatchLosses,
                                        GhostUnsupportedError, apply_model)
# MAX_GRAMS_PER_STACK is read where it is defined: to change it, set `norms.MAX_GRAMS_PER_STACK`.
from dpjax.privacy.ghost.norms import MAX_GRAMS_PER_STACK, ghost_sq_norms
from dpjax.privacy.ghost.patches import conv_patches
from dpjax.privacy.ghost.rounding import (EPS32, NormBound, gamma, gram_norm_bound, inflation,
                                          instantiated_bound, magnitude, rounding_slack,
                                          summed_bound)
from dpjax.privacy.ghost.terms import (Term, ghost_norm_is_cheaper, merge_positions, merge_views,
                                       outer_sum, per_example_outer)

__all__ = ["COLLECTIONS", "EPS32", "INPUTS", "MAX_GRAMS_PER_STACK", "PROBES", "SUPPORTED",
           "BatchLosses", "ExamplesMixedError", "GhostUnsupportedError", "NormBound", "Term",
           "apply_model", "check_examples_independent", "clipped_grad_sum", "conv_patches",
           "gamma", "ghost_norm_is_cheaper", "ghost_sq_norms", "gram_norm_bound", "inflation",
           "instantiated_bound", "magnitude", "merge_positions", "merge_views", "outer_sum",
           "per_example_outer",
           "per_example_terms", "rounding_slack", "summed_bound"]
