"""Wide ResNet with GroupNorm and weight-standardised convolutions (De et al. 2022).

The DP-friendly WRN of jax_privacy (`models/cifar.py`, see references/papers.md §6.3):
pre-activation blocks ordered ReLU -> GroupNorm(16 groups) -> WSConv, no BatchNorm, no dropout.
GroupNorm normalises each example on its own, so per-example gradients stay per-example.
"""

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # ghost imports this module's layers; at run time it is imported lazily
  from dpjax.privacy import ghost
  from dpjax.privacy.ghost import terms as ghost_terms


def standardize_kernel(kernel: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Standardises a conv kernel [*spatial, in, out] to mean 0 and variance 1 per output channel.

  The statistics are taken over the fan-in axes (all but the last); eps floors the variance so
  that a constant kernel does not divide by zero.
  """
  fan_in_axes = tuple(range(kernel.ndim - 1))
  mean = jnp.mean(kernel, axis=fan_in_axes, keepdims=True)
  var = jnp.var(kernel, axis=fan_in_axes, keepdims=True)
  return (kernel - mean) * jax.lax.rsqrt(jnp.maximum(var, eps))


class WSConv(nn.Module):
  """2D convolution with a scaled weight-standardised kernel, a learned gain and a bias.

  The kernel used is `standardize_kernel(kernel) * gain / sqrt(fan_in)`: per output channel it has
  mean 0 and variance gain**2 / fan_in, so activations keep their scale at initialisation (as the
  WSConv2D of jax_privacy / NF-Nets, which this follows).

  Maps [batch, H, W, C_in] to [batch, H', W', features] with H' = ceil(H / stride) for "SAME".
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  padding: str = "SAME"
  eps: float = 1e-6

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel_shape = (*self.kernel_size, inputs.shape[-1], self.features)
    kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    kernel = self.param("kernel", kernel_init, kernel_shape)
    gain = self.param("gain", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    fan_in = math.prod(kernel_shape[:-1])
    scaled_kernel = standardize_kernel(kernel, self.eps) * (gain / math.sqrt(fan_in))
    outputs = jax.lax.conv_general_dilated(
        inputs, scaled_kernel, window_strides=(self.strides, self.strides),
        padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return outputs + bias

  def ghost_grads(self, inputs: jax.Array, output_grads: jax.Array) -> dict:
    """Per-example gradients of kernel, gain and bias for ghost clipping (`dpjax.privacy.ghost`;
    called bound to the params), from the inputs [m, H, W, C_in] and the output gradients
    g [m, H', W', features]: kernel and gain as `StandardizedConvTerm`s (factored: the used
    kernel's gradient Σₜ pₜgₜᵀ from the input patches pₜ, pulled back through the
    standardisation), the bias's as [m, features] (Σₜ gₜ, float32)."""
    from dpjax.privacy import ghost  # here: a model alone does not need dpjax.privacy

    params = self.variables["params"]
    kernel, gain = (params[name].astype(jnp.float32) for name in ("kernel", "gain"))
    patches = ghost.conv_patches(inputs.astype(output_grads.dtype), self.kernel_size,
                                 self.strides, self.padding)
    m, fan_in = inputs.shape[0], math.prod(kernel.shape[:-1])
    flat = kernel.reshape(fan_in, self.features)
    var = jnp.var(flat, axis=0)  # the statistics standardize_kernel divides by
    term = functools.partial(
        StandardizedConvTerm, patches.reshape(m, -1, fan_in),
        output_grads.reshape(m, -1, self.features), standardize_kernel(flat, self.eps),
        jax.lax.rsqrt(jnp.maximum(var, self.eps)), gain / math.sqrt(fan_in),
        (var > self.eps).astype(jnp.float32))
    bias_grads = jnp.sum(output_grads.astype(jnp.float32), axis=(1, 2))
    return {"kernel": term(part="kernel"), "gain": term(part="gain"), "bias": bias_grads}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StandardizedConvTerm:
  """Per-example gradients of a WSConv's kernel or gain (`part`), factored for ghost clipping
  (the `ghost.Term` methods).

  The used kernel is K = s ⊙ gain/√n, s the kernel standardised per output channel o over its
  fan-in n (variance floored at eps). Example i's gradient w.r.t. K is Gᵢ = Σₜ pᵢₜgᵢₜᵀ
  [n, features] (input patches p [m, T, n], output gradients g [m, T, features]); pulled back,
    kernel: (gainₒ/(√n σₒ)) (Gₒ − mean(Gₒ)·1 − βₒ sₒ (sₒ·Gₒ)/n)   (βₒ = 1 unless var is floored),
    gain:   sₒ·Gₒ/√n.
  The pullback is linear and the same for every example, so the clipped sum is the pullback of
  Σᵢ wᵢGᵢ (one matmul, `ghost.outer_sum`): no per-example gradient is stored for it.
  Norms, per output channel (the terms of sₒ and 1 are orthogonal, ‖sₒ‖² = n·rₒ):
    gain:   (sₒ·Gₒ)²/n, with sₒ·Gₒ = Σₜ (pₜ·sₒ) gₜₒ (the patches times s: one plain matmul);
    kernel: where instantiating Gᵢ costs less than the ghost norm (T·n·p < T²(n + p), fastDP's
      rule `ghost.ghost_norm_is_cheaper`, many positions), the square-sum of the pullback of Gᵢ (float32, one batched matmul);
      else cₒ(‖Gₒ‖² − (1·Gₒ)²/n − βₒ(2 − rₒ)(sₒ·Gₒ)²/n), cₒ = (gainₒ/(√n σₒ))², with
      Σₒ cₒ‖Gₒ‖² = Σₜ,ₛ (pₜ·pₛ)(Σₒ cₒ gₜₒ gₛₒ) (ghost norm) and 1·Gₒ = Σₜ (Σ pₜ) gₜₒ: nothing of
      size n·p per example. The subtraction is accurate to float32 rounding relative to
      cₒ‖Gₒ‖² (pₜ·sₒ in bfloat16 is taken as two matmuls, s split into high and low halves).
  Rounding (`norm_bound`, a `ghost.NormBound`): the pullback P has ‖P(E)‖ ≤ ‖(√cₒEₒ)ₒ‖ (each
  column is scaled by √cₒ = gainₒ/(√n σₒ) after a projection) for the kernel, ≤ max ‖sₒ‖/√n·‖E‖
  for the gain. So rounding wᵢ·(factor) in the sum's matmul and its accumulation over positions
  move the kernel's pullback by ≤ (ε + γ_T)·Σₜ‖pₜ‖‖√c ⊙ gₜ‖ (`ghost.gram_norm_bound`'s slack of
  the c-weighted Grams), the gain's by max ‖sₒ‖/√n times `ghost.rounding_slack`; computing the
  pullback in float32 adds ≤ 2γ_{n+5}·‖(√cₒXₒ)ₒ‖ for the kernel (≤ γ_{n+1}·max ‖sₒ‖/√n·‖X‖ for
  the gain), relative to the pulled-back X, not to its image. The norms' errors: the Gram part's
  (`ghost.gram_norm_bound`), those of 1·Gₒ and sₒ·Gₒ (`_along_s`; relative to
  Aₒ = Σₜ‖pₜ‖|gₜₒ|), of the identity's ‖sₒ‖² = n·rₒ and sₒ·1 = 0 for the computed s, and of the
  subtraction; with instantiated Gᵢ, its γ_T·Σₜ‖pₜ‖‖√c ⊙ gₜ‖ and the pullback's, in the slack.
  """
  patches: jax.Array  # [m, T, n], g's dtype
  output_grads: jax.Array  # [m, T, features]
  standardized: jax.Array  # s [n, features], float32
  inv_std: jax.Array  # 1/σ [features]
  gain_scale: jax.Array  # gain/√n [features]
  active: jax.Array  # β [features]: 1.0 where the variance is not floored
  part: str = dataclasses.field(metadata=dict(static=True))  # "kernel" or "gain"

  def _pullback(self, used: jax.Array) -> jax.Array:
    """[..., n, features] (the used kernel's gradients) -> [..., n·features] or [..., features]."""
    n = used.shape[-2]
    along_s = jnp.sum(used * self.standardized, axis=-2, keepdims=True)  # sₒ·Gₒ
    if self.part == "gain":
      return along_s[..., 0, :] / math.sqrt(n)
    centred = used - jnp.mean(used, axis=-2, keepdims=True)
    kernel = (centred - self.active * self.standardized * along_s / n) * (
        self.gain_scale * self.inv_std)
    return kernel.reshape(kernel.shape[:-2] + (-1,))

  def instantiate(self) -> jax.Array:
    from dpjax.privacy import ghost
    return self._pullback(ghost.per_example_outer(self.patches, self.output_grads))

  def norm_bound(self) -> "ghost.NormBound":
    """`ghost.NormBound` of the kernel's or the gain's per-example gradients (see the class
    docstring for the rounding each bound covers)."""
    from dpjax.privacy import ghost
    (_, t, n), p = self.patches.shape, self.output_grads.shape[-1]
    along_s, along_s_error, spread = self._along_s()
    if self.part == "gain":
      sq = jnp.sum(jnp.square(along_s), axis=-1) / n
      sq_error = ghost.inflation(p + 4) * jnp.sum(_sq_error(along_s, along_s_error), -1) / n
      gain = jnp.sqrt(jnp.max(jnp.sum(jnp.square(self.standardized), 0)) / n)  # ≥ max √rₒ
      pullback_gain = ghost.inflation(n + 2) * gain
      rounding = ghost.rounding_slack(self.patches, self.output_grads)
      slack = pullback_gain * ((1 + ghost.gamma(n + 1)) * rounding
                               + ghost.gamma(n + 1) * jnp.sqrt(jnp.sum(jnp.square(spread), -1)))
      return ghost.NormBound(sq, sq_error, slack)
    g = self.output_grads.astype(jnp.float32)
    c = jnp.square(self.gain_scale * self.inv_std)
    pullback_error = 2 * ghost.gamma(n + 5)  # relative to ‖(√cₒ·Xₒ)ₒ‖, of the pullback of X
    eps = float(jnp.finfo(self.output_grads.dtype).eps)
    if not ghost.ghost_norm_is_cheaper(t, n, p):
      used = ghost.per_example_outer(self.patches, self.output_grads)  # Gᵢ as computed
      sq = jnp.sum(jnp.square(self._pullback(used)), axis=-1)
      weighted = ghost.inflation(n + p + 4) * jnp.sqrt(jnp.sum(jnp.sum(
          jnp.square(used) * c, axis=-1), axis=-1))
      # Scaled output gradients: ‖P(E)‖ ≤ Σₜ‖pₜ‖‖√c ⊙ eₜ‖ for per-position errors eₜ ≤ ε|gₜ|.
      s_c = ghost.inflation(4) * ghost.magnitude(self.patches, g * jnp.sqrt(c))
      linear = (eps + 2 * ghost.gamma(t)) * s_c  # the sum's rounding + the instantiation's
      slack = (1 + pullback_error) * linear + 2 * pullback_error * weighted
      return ghost.NormBound(sq, jnp.zeros_like(sq), slack)
    full = jax.lax.Precision.HIGHEST
    gram_p = jnp.einsum("mtd,msd->mts", self.patches, self.patches,
                        preferred_element_type=jnp.float32, precision=full)
    gram_g = jnp.einsum("mtp,msp,p->mts", g, g, c, precision=full)
    main = ghost.gram_norm_bound(gram_p, gram_g, ghost.gamma(n), ghost.gamma(p + 2), eps)
    sums = jnp.sum(self.patches, axis=-1, dtype=jnp.float32)  # Σ pₜ [m, T]
    along_1 = jnp.einsum("mt,mtp->mp", sums, g, precision=full)  # 1·Gₒ
    # Σ pₜ within γ_n·√n‖pₜ‖, the sum over t within γ_T(1 + γ_n): ≤ (γ_n + 2γ_T)·√n·Aₒ.
    along_1_error = (ghost.gamma(n) + 2 * ghost.gamma(t)) * math.sqrt(n) * spread
    r = jnp.sum(jnp.square(self.standardized), axis=0) / n  # ‖sₒ‖²/n
    weight = self.active * (2.0 - r)
    projections = c * (jnp.square(along_1) + weight * jnp.square(along_s)) / n
    # The identity needs ‖sₒ‖² = n·rₒ (r within γ_{n+2}) and sₒ·1 = 0: the computed s's mean is
    # not exactly 0, which moves the square by ≤ 2cₒ‖Gₒ‖²√rₒ|sₒ·1|/n, and |sₒ·1| is within
    # γ_n·√n‖sₒ‖ of its computed value.
    projections_error = c * (_sq_error(along_1, along_1_error)
                             + jnp.abs(weight) * _sq_error(along_s, along_s_error)
                             + self.active * ghost.gamma(n + 2) * r * jnp.square(along_s)) / n
    s_norms = jnp.sqrt(jnp.sum(jnp.square(self.standardized), axis=0))
    off_mean = 2 * jnp.max(jnp.abs(jnp.sum(self.standardized, axis=0))
                           + ghost.gamma(n) * math.sqrt(n) * s_norms) / n
    total = jnp.sum(projections, axis=-1)
    sq = jnp.maximum(main.sq - total, 0.0)
    sq_error = (main.sq_error + ghost.inflation(p + 2) * jnp.sum(projections_error, axis=-1)
                + ghost.gamma(p + 8) * (main.sq + total)
                + ghost.inflation(n + 2) * off_mean * (main.sq + main.sq_error))
    weighted = jnp.sqrt(main.sq + main.sq_error)  # ≥ ‖(√cₒ·Gₒ)ₒ‖
    slack = (1 + pullback_error) * main.slack + pullback_error * weighted
    return ghost.NormBound(sq, sq_error, slack)

  def _along_s(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sₒ·Gₒ [m, features] as computed, a bound on its error, Aₒ ≥ Σₜ‖pₜ‖|gₜₒ|). pₜ·sₒ is within
    (2γ_{n+1} + ε²)‖pₜ‖‖sₒ‖ (s split into bfloat16 halves leaves ≤ ε²/4 of s out) and the sum
    over t within γ_T(1 + ·); doubled for the (1 + γ) factors and ‖sₒ‖ ≤ √(n·rₒ)(1 + γ_n)."""
    from dpjax.privacy import ghost
    (_, t, n) = self.patches.shape
    g = self.output_grads.astype(jnp.float32)
    full = jax.lax.Precision.HIGHEST
    along_s = jnp.einsum("mtp,mtp->mp", self._patches_times_s(), g, precision=full)
    patch_norms = jnp.sqrt(jnp.sum(jnp.square(self.patches.astype(jnp.float32)), axis=-1))
    spread = ghost.inflation(n + 2, t + 2) * jnp.einsum("mt,mtp->mp", patch_norms, jnp.abs(g),
                                                         precision=full)
    s_norms = jnp.sqrt(jnp.sum(jnp.square(self.standardized), axis=0))  # ‖sₒ‖ [features]
    eps = float(jnp.finfo(self.patches.dtype).eps)
    error = 2 * (2 * ghost.gamma(n + 1) + eps * eps + ghost.gamma(t)) * s_norms * spread
    return along_s, error, spread

  def _patches_times_s(self) -> jax.Array:
    """pₜ·sₒ [m, T, features], float32: two bfloat16 matmuls (s = high + low) for bfloat16
    patches, one at full precision for float32."""
    parts = ((self.standardized,) if self.patches.dtype == jnp.float32 else
             (high := self.standardized.astype(self.patches.dtype),
              (self.standardized - high.astype(jnp.float32)).astype(self.patches.dtype)))
    return sum(jnp.einsum("mtn,np->mtp", self.patches, part, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST) for part in parts)

  def weighted_sum(self, weights: jax.Array, real: jax.Array) -> jax.Array:
    from dpjax.privacy import ghost
    return self._pullback(ghost.outer_sum(self.patches, self.output_grads, weights, real))

  def mask_rows(self, rows: jax.Array) -> "StandardizedConvTerm | ghost_terms.Summed":
    """Whole output channels masked (`ghost.Term.mask_rows`): the pullback acts channel by
    channel, so masking the kernel's (or the gain's) gradient in channel o is masking Gₒ, i.e.
    the output gradients' column o. A kernel whose norm instantiates its gradients (many
    positions) is instantiated once and kept, as `ghost.Outer.mask_rows` does."""
    from dpjax.privacy import ghost
    from dpjax.privacy.ghost import terms
    mask = terms.row_mask_over(self.output_grads.shape[-1], rows, self.output_grads.dtype)
    masked = dataclasses.replace(self, output_grads=self.output_grads * mask)
    (_, t, n), p = self.patches.shape, self.output_grads.shape[-1]
    if self.part == "gain" or ghost.ghost_norm_is_cheaper(t, n, p):
      return masked
    return terms.Summed(masked.instantiate())

  def merge_views(self, views: int) -> "StandardizedConvTerm":
    """Augmentation multiplicity (`ghost.terms.merge_views`): each example's views' positions
    as its own, [m·views, T, ·] -> [m, views·T, ·]; the pullback is the same for every row."""
    from dpjax.privacy import ghost
    return dataclasses.replace(self, patches=ghost.merge_positions(self.patches, views),
                               output_grads=ghost.merge_positions(self.output_grads, views))


class PreActivationConv(nn.Module):
  """ReLU -> GroupNorm -> WSConv: [batch, H, W, C_in] -> [batch, H/strides, W/strides, features]."""

  features: int
  kernel_size: int
  strides: int = 1
  num_groups: int = 16

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    normalized = nn.GroupNorm(num_groups=self.num_groups)(nn.relu(inputs))
    kernel_size = (self.kernel_size, self.kernel_size)
    return WSConv(self.features, kernel_size, strides=self.strides)(normalized)


class WideResNetBlock(nn.Module):
  """Pre-activation residual block: two 3x3 PreActivationConvs plus a skip path.

  The skip path is the identity, or ReLU -> GN -> 1x1 WSConv (with the block's stride) where the
  block changes the shape. Maps [batch, H, W, C_in] to [batch, H/strides, W/strides, features].
  """

  features: int
  strides: int = 1
  num_groups: int = 16

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    residual = PreActivationConv(self.features, 3, self.strides, self.num_groups)(inputs)
    residual = PreActivationConv(self.features, 3, 1, self.num_groups)(residual)
    if self.strides == 1 and inputs.shape[-1] == self.features:
      return inputs + residual
    skip = PreActivationConv(self.features, 1, self.strides, self.num_groups, name="skip")(inputs)
    return skip + residual


class WideResNet(nn.Module):
  """WRN-depth-width for CIFAR-sized images (WRN-16-4: 2.75M parameters with 10 classes).

  3x3 WSConv(16) -> 3 stages of (depth - 4) / 6 blocks with 16*width, 32*width, 64*width channels
  (strides 1, 2, 2 on each stage's first block) -> ReLU -> GroupNorm -> global average pool
  -> Dense(num_classes).

  Maps images [batch, H, W, C] (float32) to logits [batch, num_classes].
  """

  num_classes: int = 10
  depth: int = 16
  width: int = 4
  num_groups: int = 16

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    blocks_per_stage = wrn_blocks_per_stage(self.depth)
    x = WSConv(16, (3, 3), name="first_conv")(images)
    for stage, (channels, strides) in enumerate(zip((16, 32, 64), (1, 2, 2))):
      for block in range(blocks_per_stage):
        x = WideResNetBlock(
            channels * self.width, strides if block == 0 else 1, self.num_groups,
            name=f"stage{stage + 1}_block{block + 1}")(x)
    x = nn.GroupNorm(num_groups=self.num_groups, name="final_norm")(nn.relu(x))
    pooled = jnp.mean(x, axis=(1, 2))  # [batch, 64 * width]
    return nn.Dense(self.num_classes, name="head")(pooled)


def _sq_error(value: jax.Array, error: jax.Array) -> jax.Array:
  """A bound on |v̂² − v²| for |v̂ − v| ≤ error: (2|v̂| + error)·error."""
  return (2 * jnp.abs(value) + error) * error


def wrn_blocks_per_stage(depth: int) -> int:
  """Number of residual blocks per stage, (depth - 4) / 6; raises ValueError for other depths."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(
        f"WideResNet depth must be 6k + 4 with k >= 1 (10, 16, 22, 28, 40, ...), got {depth}.")
  return (depth - 4) // 6
