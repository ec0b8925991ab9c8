"""Wide ResNet with GroupNorm and weight-standardised convolutions (De et al. 2022).

The DP-friendly WRN of jax_privacy (`models/cifar.py`, see references/papers.md §6.3):
pre-activation blocks ordered ReLU -> GroupNorm(16 groups) -> WSConv, no BatchNorm, no dropout.
GroupNorm normalises each example on its own, so per-example gradients stay per-example.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


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
  Rounding wᵢgᵢ to bfloat16 in the sum's matmul moves ‖Gᵢ‖ by at most `ghost.rounding_slack`,
  and the pullback by at most its largest per-channel gain (kernel: max gainₒ/(√n σₒ), gain:
  max ‖sₒ‖/√n ≤ 1) times that: the slack reported.
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

  def sq_norms_and_slack(self) -> tuple[jax.Array, jax.Array]:
    from dpjax.privacy import ghost
    (_, t, n), p = self.patches.shape, self.output_grads.shape[-1]
    slack = ghost.rounding_slack(self.patches, self.output_grads)
    kernel_slack = jnp.max(jnp.abs(self.gain_scale) * self.inv_std) * slack
    if self.part == "kernel" and not ghost.ghost_norm_is_cheaper(t, n, p):
      return jnp.sum(jnp.square(self.instantiate()), axis=-1), kernel_slack
    g = self.output_grads.astype(jnp.float32)
    full = jax.lax.Precision.HIGHEST
    along_s = jnp.einsum("mtp,mtp->mp", self._patches_times_s(), g, precision=full)  # sₒ·Gₒ
    r = jnp.sum(jnp.square(self.standardized), axis=0) / n  # ‖sₒ‖²/n
    if self.part == "gain":
      return jnp.sum(jnp.square(along_s), axis=-1) / n, jnp.max(jnp.sqrt(r)) * slack
    c = jnp.square(self.gain_scale * self.inv_std)
    gram_p = jnp.einsum("mtd,msd->mts", self.patches, self.patches,
                        preferred_element_type=jnp.float32, precision=full)
    gram_g = jnp.einsum("mtp,msp,p->mts", g, g, c, precision=full)
    sums = jnp.sum(self.patches, axis=-1, dtype=jnp.float32)  # Σ pₜ [m, T]
    along_1 = jnp.einsum("mt,mtp->mp", sums, g, precision=full)  # 1·Gₒ
    sq = jnp.sum(gram_p * gram_g, axis=(1, 2)) - jnp.sum(
        c * (jnp.square(along_1) + self.active * (2.0 - r) * jnp.square(along_s)), axis=-1) / n
    return jnp.maximum(sq, 0.0), kernel_slack

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


def wrn_blocks_per_stage(depth: int) -> int:
  """Number of residual blocks per stage, (depth - 4) / 6; raises ValueError for other depths."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(
        f"WideResNet depth must be 6k + 4 with k >= 1 (10, 16, 22, 28, 40, ...), got {depth}.")
  return (depth - 4) // 6
