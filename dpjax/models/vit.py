"""Vision Transformer (Dosovitskiy et al. 2021), big_vision-style, without dropout.

Patch embedding by a Conv with stride = patch size, a class token, learned position embeddings,
pre-LayerNorm transformer blocks, a final LayerNorm and a linear head on the class token.
LayerNorm and attention act within one example, so examples never interact.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# Sizes of the standard variants (Dosovitskiy et al. 2021; Touvron et al. 2021 for Ti and S).
VIT_VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def num_patches(image_size: int, patch_size: int) -> int:
  """Patches per image, (image_size / patch_size)**2; ValueError unless patch_size divides it."""
  if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
    raise ValueError(
        f"ViT image_size ({image_size}) must be a positive multiple of patch_size "
        f"({patch_size}); choose a patch size that divides the image size, or resize the images.")
  return (image_size // patch_size) ** 2


def vit_config(
    variant: str = "Ti", *, patch_size: int = 16, image_size: int = 224, **overrides: int
) -> dict[str, int]:
  """The ViT constructor arguments for a variant, e.g. `ViT(num_classes=10, **vit_config("S"))`.

  Args:
    variant: "Ti", "S" or "B".
    patch_size: side of the square patches; must divide image_size.
    image_size: side of the square input images.
    **overrides: replacements for width, depth, num_heads or mlp_dim, e.g. depth=2, or a CPU-test
      "mini" ViT with width=32, depth=2, num_heads=2, mlp_dim=64.

  Returns:
    dict with keys patch_size, image_size, width, depth, num_heads, mlp_dim.

  Raises:
    ValueError: for an unknown variant or override, a patch size that does not divide the image
      size, or a width not divisible by the number of heads.
  """
  if variant not in VIT_VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; known variants: {sorted(VIT_VARIANTS)}.")
  unknown = set(overrides) - set(VIT_VARIANTS[variant])
  if unknown:
    raise ValueError(
        f"Unknown ViT overrides {sorted(unknown)}; allowed: {sorted(VIT_VARIANTS[variant])}.")
  config = {**VIT_VARIANTS[variant], **overrides}
  num_patches(image_size, patch_size)
  if config["width"] % config["num_heads"]:
    raise ValueError(
        f"ViT width ({config['width']}) must be divisible by num_heads ({config['num_heads']}).")
  return dict(patch_size=patch_size, image_size=image_size, **config)


def fused_attention(query, key, value, bias=None, mask=None, **unused):
  """`jax.nn.dot_product_attention` with flax's attention_fn signature; [batch, tokens, heads,
  head_dim] in and out. No dropout. XLA's implementation (jax ≤ 0.11 picks it by default): the
  scores [batch, heads, T, T] are formed in memory."""
  del unused
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask)


_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def padded_attention(implementation: str | None = "cudnn", multiple: int = 64):
  """An attention_fn that pads the tokens to a multiple of `multiple` and masks the padding by
  sequence lengths, for kernels that take only such lengths: cuDNN's flash attention refused the
  ViTs' 197 and 65 tokens in training on jax 0.11.2 ("Unsupported sequence length"). Padding and
  masking stay within each example. [batch, tokens, heads, head_dim] in and out.

  cuDNN takes bfloat16 and float16 only: other inputs (the float32 initialisation, which needs
  only shapes) take XLA's kernel for the same function. A run asks for bfloat16 with "cudnn"
  (`perf.dtype`; the config check refuses float32), so its steps use cuDNN's kernel."""
  def attention(query, key, value, bias=None, mask=None, **unused):
    del unused
    if bias is not None or mask is not None:
      raise ValueError("padded attention takes no bias or mask (the ViT passes none).")
    kernel = implementation if query.dtype in _CUDNN_DTYPES else None
    batch, tokens = query.shape[:2]
    pad = [(0, 0), (0, -tokens % multiple), (0, 0), (0, 0)]
    lengths = jnp.full((batch,), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(
        *(jnp.pad(x, pad) for x in (query, key, value)), query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation=kernel)
    return out[:, :tokens]
  return attention


def cudnn_attention_runs(dtype) -> bool:
  """Whether cuDNN's flash attention takes inputs of `dtype` on the default device: an NVIDIA GPU
  of compute capability 8.0 or later (Ampere on; cuDNN's fused attention needs it) and bfloat16 or
  float16 inputs. Decided at trace time from the device, so a CPU run never asks for it."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)  # "9.0" on an H200; CUDA devices only
  return (device.platform == "gpu" and capability is not None
          and int(str(capability).split(".")[0]) >= 8 and jnp.dtype(dtype) in _CUDNN_DTYPES)


_cudnn_padded = padded_attention("cudnn")


def auto_attention(query, key, value, bias=None, mask=None, **unused):
  """The default attention_fn: cuDNN's flash attention on padded tokens (`padded_attention`) where
  it runs (`cudnn_attention_runs`: an NVIDIA GPU of compute capability ≥ 8, bf16/fp16 inputs, and
  no bias or mask), else XLA's kernel (`fused_attention`). The same function either way; on one
  H200 cuDNN's made ViT-B/16 224²'s DP and non-private steps ~30% faster
  (`benchmarks/results/README.md`). [batch, tokens, heads, head_dim] in and out."""
  del unused
  if bias is None and mask is None and cudnn_attention_runs(query.dtype):
    return _cudnn_padded(query, key, value)
  return fused_attention(query, key, value, bias=bias, mask=mask)


# attention="auto" (the default): cuDNN's kernel where it runs, else XLA's; "einsum": flax's
# softmax(QKᵀ/√d)V written out; "fused": one op (XLA's); "cudnn": cuDNN's flash attention on
# tokens padded to a multiple of 64 (GPU only, bf16/fp16; a run that cannot take it fails).
ATTENTION_FNS = {"auto": auto_attention, "einsum": nn.dot_product_attention,
                 "fused": fused_attention, "cudnn": _cudnn_padded}


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU MLP.

  Maps tokens [batch, tokens, width] to [batch, tokens, width].
  """

  num_heads: int
  mlp_dim: int
  attention: str = "auto"

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    width = tokens.shape[-1]
    attention = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, deterministic=True, name="attention",
        attention_fn=ATTENTION_FNS[self.attention])
    tokens = tokens + attention(nn.LayerNorm(name="attention_norm")(tokens))
    hidden = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(nn.LayerNorm(name="mlp_norm")(tokens)))
    return tokens + nn.Dense(width, name="mlp_out")(hidden)


class ScannedBlock(EncoderBlock):
  """An EncoderBlock in nn.scan's (carry, input) -> (carry, output) form: tokens are the carry."""

  @nn.compact
  def __call__(self, tokens: jax.Array, unused: None) -> tuple[jax.Array, None]:
    return super().__call__(tokens), None


class TokenEmbedding(nn.Module):
  """Prepends a learned class token and adds learned position embeddings:
  patches [batch, n, width] -> tokens [batch, n + 1, width]."""

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    batch, n, width = patches.shape
    class_token = self.param("class_token", nn.initializers.zeros, (1, 1, width))
    tokens = jnp.concatenate(
        [jnp.broadcast_to(class_token, (batch, 1, width)).astype(patches.dtype), patches], axis=1)
    position = self.param("position_embedding", nn.initializers.normal(stddev=0.02),
                          (1, n + 1, width))
    return tokens + position.astype(patches.dtype)

  def ghost_grads(self, inputs: jax.Array, output_grads: jax.Array) -> dict[str, jax.Array]:
    """Per-example gradients of the params from the output gradients g [m, n + 1, width], for
    ghost clipping (`dpjax.privacy.ghost`): position_embedding gᵢ, class_token gᵢ[0]."""
    del inputs
    return {"class_token": output_grads[:, None, :1], "position_embedding": output_grads[:, None]}


class ViT(nn.Module):
  """Vision Transformer classifier (ViT-Ti/16 at 224: 5.7M parameters, ViT-B/16: 86M, 1000 classes).

  Maps images [batch, image_size, image_size, channels] (float32) to logits [batch, num_classes]:
  patches [batch, (image_size/patch_size)**2, width] -> prepend class token -> add position
  embedding -> depth EncoderBlocks -> LayerNorm -> Dense head on the class token.
  Build the size arguments with `vit_config`. With scan_blocks the params of the blocks are
  params["blocks"] stacked along a leading depth axis (`stack_blocks` converts).
  """

  num_classes: int
  patch_size: int = 16
  image_size: int = 224
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  attention: str = "auto"  # or "fused", "einsum", "cudnn"; see ATTENTION_FNS
  # scan_blocks: the blocks as one nn.scan over a stack of their params (params["blocks"], each
  # leaf [depth, ...]): the same function, compiled once for all blocks instead of depth times.
  # Every variable collection stacks along the scanned axis (ghost clipping's included).
  scan_blocks: bool = False
  scan_unroll: int = 1  # blocks per iteration of the scan (lax.scan's unroll)
  # input_resize: images of another size are first resized (bilinear, each image on its own) to
  # image_size × image_size on the device, e.g. 32² CIFAR images for a 224² ViT: the host reads
  # and sends the small images. No parameters, so nothing for clipping; examples stay apart.
  input_resize: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.input_resize and images.ndim == 4:
      images = jax.image.resize(images, (images.shape[0], self.image_size, self.image_size,
                                         images.shape[3]), "bilinear")
    self._check_image_shape(images.shape)
    patch = (self.patch_size, self.patch_size)
    x = nn.Conv(self.width, patch, strides=patch, padding="VALID", name="patch_embedding")(images)
    x = x.reshape((x.shape[0], -1, self.width))  # [batch, num_patches, width]
    x = TokenEmbedding(name="embedding")(x)
    if self.scan_blocks:
      blocks = nn.scan(ScannedBlock, variable_axes={True: 0}, split_rngs={"params": True},
                       length=self.depth, unroll=self.scan_unroll)
      x, _ = blocks(self.num_heads, self.mlp_dim, self.attention, name="blocks")(x, None)
    else:
      for index in range(self.depth):
        x = EncoderBlock(self.num_heads, self.mlp_dim, self.attention, name=f"block{index}")(x)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])

  def _check_image_shape(self, shape: tuple[int, ...]) -> None:
    if self.attention not in ATTENTION_FNS:
      raise ValueError(f"ViT attention {self.attention!r} is unknown; use one of "
                       f"{sorted(ATTENTION_FNS)}.")
    num_patches(self.image_size, self.patch_size)
    if len(shape) != 4 or shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
          f"This ViT takes images [batch, {self.image_size}, {self.image_size}, channels], got "
          f"shape {tuple(shape)}; build it with image_size matching the data, or with "
          "input_resize=True to resize the images on the device.")


def stack_blocks(params: dict, depth: int) -> dict:
  """The params of a ViT with separate blocks (block0 … block{depth-1}) as those of the same ViT
  with scan_blocks=True (params["blocks"], leaves stacked along a leading depth axis)."""
  blocks = [params[f"block{index}"] for index in range(depth)]
  rest = {name: value for name, value in params.items() if not name.startswith("block")}
  return {**rest, "blocks": jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *blocks)}
