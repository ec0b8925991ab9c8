"""A 2-D convolution's input patches: a conv kernel's per-example gradient is Σₜ pₜgₜᵀ over its
output positions t, pₜ the input patch that position reads.

Patches are gathered in (kh, kw, C) order (`conv_patches`): a reshape when the windows tile the
input (stride = kernel, no padding: the ViT patch embedding), else kh·kw strided slices of the
padded input. Only input-dilated convs use `conv_general_dilated_patches` (an identity-kernel
convolution, ~9× a 3×3 layer's FLOPs, slow on GPU), in (C, kh, kw) order (`channels_first`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def channels_first(module: nn.Conv) -> bool:
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


def module_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
  """An nn.Conv's input patches: `conv_patches`, or under input dilation those of
  `conv_general_dilated_patches`, in (C, kh, kw) order (`channels_first`)."""
  if not channels_first(module):
    return conv_patches(x, tuple(module.kernel_size), module.strides, _conv_padding(module),
                        module.kernel_dilation)
  return jax.lax.conv_general_dilated_patches(
      x, tuple(module.kernel_size), _pair(module.strides), _conv_padding(module),
      lhs_dilation=_pair(module.input_dilation), rhs_dilation=_pair(module.kernel_dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
