"""Tests for dpjax.models: architectures, sizes, per-example gradients and the BatchNorm guard."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import models
from dpjax.models import registry, vit
from dpjax.train import step as step_lib

NUM_CLASSES = 10
BATCH = 3

# (name, kwargs, input_shape): small enough for CPU, one per architecture.
SMALL_MODELS = {
    "cnn_tanh_mnist": ("cnn_tanh_mnist", {}, (28, 28, 1)),
    "cnn_tanh_cifar10": ("cnn_tanh_cifar10", {}, (32, 32, 3)),
    # depth 10, width 1: stage 1 has an identity skip, stages 2 and 3 a projected one.
    "wrn_tiny": ("wrn", dict(depth=10, width=1), (8, 8, 3)),
    # stage 1 has an identity skip, stage 2 a projected one.
    "resnet_tiny": ("resnet", dict(stage_sizes=(1, 1), width=4, num_groups=2), (8, 8, 3)),
    "vit_mini": ("vit", dict(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64),
                 (16, 16, 3)),
}


# Tests run jitted functions and NumPy inputs: on CPU one XLA compile per function is much faster
# than compiling every eager op.


# Backward passes take seconds to compile on CPU; a lower XLA optimisation level halves that and
# changes no result these tests compare.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _images(input_shape, batch=BATCH, seed=0):
  return np.random.default_rng(seed).uniform(size=(batch, *input_shape)).astype(np.float32)


def _init(model, images):
  return jax.jit(model.init)(jax.random.key(0, impl="rbg"), images)  # rbg: cheap to compile


def _build_and_init(name, kwargs, input_shape):
  model = models.build_model(name, NUM_CLASSES, input_shape=input_shape, **kwargs)
  return model, _init(model, _images(input_shape, batch=1))


def _num_params(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _abstract_params(model, input_shape):
  example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), example)["params"]


@pytest.fixture(scope="module", params=sorted(SMALL_MODELS))
def small_model(request):
  name, kwargs, input_shape = SMALL_MODELS[request.param]
  model, variables = _build_and_init(name, kwargs, input_shape)
  return model, variables, input_shape


# --- every model ---------------------------------------------------------------------------------

def test_output_is_logits_per_example(small_model):
  model, variables, input_shape = small_model
  logits = jax.eval_shape(model.apply, variables, _images(input_shape))
  assert (logits.shape, logits.dtype) == ((BATCH, NUM_CLASSES), jnp.float32)


def test_variables_are_params_only(small_model):
  _, variables, _ = small_model
  assert set(variables) == {"params"}


def test_vmapped_per_example_grads_match_a_loop_over_examples(small_model):
  model, variables, input_shape = small_model
  images = _images(input_shape, seed=2)
  labels = np.arange(BATCH) % NUM_CLASSES

  def per_example_loss(params, image, label):
    logits = model.apply({"params": params}, image[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, label[None]).sum()

  grad_fn = jax.grad(per_example_loss)
  with jax.default_matmul_precision("float32"):  # no TF32 on GPUs: compare like with like
    vmapped_grad_fn = jax.jit(jax.vmap(grad_fn, (None, 0, 0)), compiler_options=_FAST_COMPILE)
    vmapped = vmapped_grad_fn(variables["params"], images, labels)
    single = jax.jit(grad_fn, compiler_options=_FAST_COMPILE)
    expected_per_example = [single(variables["params"], images[i], labels[i]) for i in range(BATCH)]
  for i, expected in enumerate(expected_per_example):
    got = jax.tree.map(lambda leaf: leaf[i], vmapped)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6), got, expected)
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(vmapped)]
  assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
  assert any(np.any(leaf != 0) for leaf in leaves)


def test_our_models_do_not_mix_examples(small_model):
  model, variables, input_shape = small_model
  models.assert_no_cross_example_dependence(model.apply, variables, _images(input_shape))


# --- tanh CNNs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, input_shape, flatten_size, hidden", [
    ("cnn_tanh_mnist", (28, 28, 1), 512, 32),
    ("cnn_tanh_cifar10", (32, 32, 3), 2048, 128),
])
def test_cnn_flatten_size(name, input_shape, flatten_size, hidden):
  params = _abstract_params(models.build_model(name, NUM_CLASSES), input_shape)
  assert params["fc1"]["kernel"].shape == (flatten_size, hidden)


def test_mnist_cnn_layer_sizes_match_the_paper():
  params = _abstract_params(models.MnistTanhCNN(num_classes=10), (28, 28, 1))
  layer_sizes = {layer: _num_params(params[layer]) for layer in params}
  assert layer_sizes == {"conv1": 1040, "conv2": 8224, "fc1": 16416, "fc2": 330}
  assert _num_params(params) == 26010


def test_cifar10_cnn_layer_sizes():
  params = _abstract_params(models.Cifar10TanhCNN(num_classes=10), (32, 32, 3))
  kernel_shapes = [params[f"conv{i}"]["kernel"].shape for i in range(1, 7)]
  assert kernel_shapes == [(3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64), (3, 3, 64, 64),
                           (3, 3, 64, 128), (3, 3, 128, 128)]
  assert _num_params(params) == 550570


@pytest.mark.parametrize("input_shape, expected", [
    ((28, 28, 1), models.MnistTanhCNN), ((32, 32, 3), models.Cifar10TanhCNN)])
def test_cnn_tanh_picks_the_variant_by_input_shape(input_shape, expected):
  assert isinstance(models.build_model("cnn_tanh", 10, input_shape=input_shape), expected)


@pytest.mark.parametrize("kwargs", [{}, dict(input_shape=(64, 64, 3))])
def test_cnn_tanh_without_a_known_input_shape_is_rejected(kwargs):
  with pytest.raises(ValueError, match="cnn_tanh_mnist"):
    models.build_model("cnn_tanh", 10, **kwargs)


# --- WRN -----------------------------------------------------------------------------------------

def test_wrn_16_4_has_2_75m_params_and_the_paper_structure():
  model = models.build_model("wrn_16_4", 10)
  assert (model.depth, model.width) == (16, 4)
  params = _abstract_params(model, (32, 32, 3))
  assert 2.74e6 < _num_params(params) < 2.76e6
  assert params["first_conv"]["kernel"].shape == (3, 3, 3, 16)
  blocks = sorted(key for key in params if key.startswith("stage"))
  assert blocks == [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2)]
  for stage, channels in zip((1, 2, 3), (64, 128, 256)):
    first, second = params[f"stage{stage}_block1"], params[f"stage{stage}_block2"]
    assert first["skip"]["WSConv_0"]["kernel"].shape[:2] == (1, 1)
    assert first["skip"]["WSConv_0"]["kernel"].shape[-1] == channels
    assert "skip" not in second
  assert params["head"]["kernel"].shape == (256, 10)
  paths = [str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not any("BatchNorm" in path for path in paths)


def test_resnet18_has_11_2m_params_and_resnet18s_structure_with_groupnorm():
  model = models.build_model("resnet18", 10)
  params = _abstract_params(model, (32, 32, 3))
  assert 11.17e6 < _num_params(params) < 11.18e6  # ResNet-18 for CIFAR-10 (BatchNorm's count)
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
  blocks = sorted(key for key in params if key.startswith("stage"))
  assert blocks == [f"stage{s}_block{b}" for s in (1, 2, 3, 4) for b in (1, 2)]
  assert "skip_conv" not in params["stage1_block1"]
  for stage, channels in zip((2, 3, 4), (128, 256, 512)):
    first = params[f"stage{stage}_block1"]
    assert first["skip_conv"]["kernel"].shape == (1, 1, channels // 2, channels)
    assert "skip_conv" not in params[f"stage{stage}_block2"]
  assert params["head"]["kernel"].shape == (512, 10)
  paths = [str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not any("BatchNorm" in path for path in paths)
  assert sum("norm" in path for path in paths) == 2 * 20  # GroupNorm scale, bias: 20 norms
  quarter = _abstract_params(models.build_model("resnet18", 10, width=16, num_groups=8),
                             (32, 32, 3))
  assert 0.70e6 < _num_params(quarter) < 0.71e6
  with pytest.raises(ValueError, match="num_groups = 16 must divide width = 8"):
    models.build_model("resnet18", 10, width=8)


@pytest.mark.parametrize("depth", [8, 12, 4])
def test_wrn_rejects_depths_not_6k_plus_4(depth):
  with pytest.raises(ValueError, match="6k \\+ 4"):
    models.build_model("wrn", 10, depth=depth)


def test_standardize_kernel_has_mean_0_and_variance_1_per_output_channel():
  kernel = 3.0 + 0.5 * np.random.default_rng(0).normal(size=(3, 3, 8, 5)).astype(np.float32)
  standardized = np.asarray(jax.jit(models.standardize_kernel)(kernel), np.float64)
  np.testing.assert_allclose(standardized.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(standardized.var(axis=(0, 1, 2)), 1.0, rtol=1e-4)


def test_wsconv_equals_a_plain_conv_with_the_scaled_standardized_kernel():
  conv = models.WSConv(features=5, kernel_size=(3, 3), strides=2)
  images = _images((9, 9, 4))
  params = _init(conv, images)["params"]
  params = dict(params, gain=np.arange(1.0, 6.0, dtype=np.float32),
                bias=np.linspace(-1.0, 1.0, 5, dtype=np.float32))
  kernel = np.asarray(params["kernel"], np.float64)
  centered = kernel - kernel.mean(axis=(0, 1, 2))
  fan_in = 3 * 3 * 4
  scaled = centered / centered.std(axis=(0, 1, 2)) * params["gain"] / math.sqrt(fan_in)
  reference = jax.jit(nn.Conv(5, (3, 3), strides=2, padding="SAME").apply)(
      {"params": {"kernel": scaled.astype(np.float32), "bias": params["bias"]}}, images)
  got = jax.jit(conv.apply)({"params": params}, images)
  np.testing.assert_allclose(got, reference, atol=1e-5)


def test_wsconv_ignores_the_scale_and_shift_of_each_output_channel_of_its_kernel():
  conv = models.WSConv(features=4)
  images = _images((6, 6, 2))
  params = _init(conv, images)["params"]
  transformed = dict(params, kernel=params["kernel"] * np.array([0.1, 2.0, 7.0, 1.0]) + 3.0)
  apply = jax.jit(conv.apply)
  np.testing.assert_allclose(apply({"params": transformed}, images),
                             apply({"params": params}, images), rtol=1e-4, atol=1e-4)


# --- ViT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, image_size, num_params", [
    ("Ti", 224, 5.7e6), ("B", 224, 86.6e6), ("B", 384, 86.9e6), ("L", 224, 304.3e6)])
def test_vit_16_has_the_published_size(variant, image_size, num_params):
  model = models.build_model("vit", 1000, variant=variant, patch_size=16, image_size=image_size)
  params = _abstract_params(model, (image_size, image_size, 3))
  assert abs(_num_params(params) - num_params) / num_params < 0.01
  assert params["embedding"]["position_embedding"].shape[1] == (image_size // 16) ** 2 + 1


@pytest.mark.parametrize("variant, sizes", [
    ("Ti", (192, 12, 3, 768)), ("S", (384, 12, 6, 1536)), ("B", (768, 12, 12, 3072)),
    ("L", (1024, 24, 16, 4096))])
def test_vit_config_variants(variant, sizes):
  config = models.vit_config(variant)
  assert (config["width"], config["depth"], config["num_heads"], config["mlp_dim"]) == sizes
  assert models.vit_config(variant, depth=2)["depth"] == 2


@pytest.mark.parametrize("image_size, patch_size", [(32, 5), (224, 15), (16, 0)])
def test_vit_rejects_a_patch_size_that_does_not_divide_the_image(image_size, patch_size):
  with pytest.raises(ValueError, match="multiple of patch_size"):
    models.vit_config("Ti", image_size=image_size, patch_size=patch_size)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    models.build_model("vit", 10, image_size=image_size, patch_size=patch_size)


def test_vit_rejects_images_of_another_size():
  model = models.ViT(num_classes=10, **models.vit_config(
      "Ti", patch_size=4, image_size=16, width=32, depth=1, num_heads=2, mlp_dim=64))
  with pytest.raises(ValueError, match="image_size"):
    jax.eval_shape(model.init, jax.random.key(0), _images((32, 32, 3), batch=1))


@pytest.mark.parametrize("variant, overrides, match", [
    ("H", {}, "Unknown ViT variant"),
    ("Ti", dict(heads=4), "Unknown ViT overrides"),
    ("Ti", dict(num_heads=5), "divisible by num_heads"),
])
def test_vit_config_rejects_bad_settings(variant, overrides, match):
  with pytest.raises(ValueError, match=match):
    models.vit_config(variant, **overrides)


def test_vit_input_resize_is_the_plain_vit_on_images_resized_first():
  """32² images for a ViT of image_size 48 (the 224² ViTs on CIFAR): each image bilinearly
  resized on its own, then the same ViT; without input_resize the shape is refused."""
  kwargs = dict(variant="Ti", patch_size=16, image_size=48, depth=1)
  resized = models.build_model("vit", 10, input_resize=True, input_shape=(32, 32, 3), **kwargs)
  plain = models.build_model("vit", 10, **kwargs)
  images = _images((32, 32, 3))
  variables = _init(resized, images[:1])
  big = jax.image.resize(images, (BATCH, 48, 48, 3), "bilinear")
  np.testing.assert_allclose(resized.apply(variables, images), plain.apply(variables, big),
                             rtol=1e-5, atol=1e-6)
  models.assert_no_cross_example_dependence(resized.apply, variables, images)
  with pytest.raises(ValueError, match="input_resize=True"):
    plain.apply(variables, images)


def test_vit_image_size_defaults_to_the_input_shape():
  model = models.build_model("vit", 10, patch_size=8, input_shape=(32, 32, 3), depth=1)
  assert model.image_size == 32


# --- registry ------------------------------------------------------------------------------------

def test_unknown_model_name_lists_the_known_names():
  with pytest.raises(ValueError, match="known names: cnn_tanh, cnn_tanh_cifar10") as error:
    models.build_model("resnet50", 10)
  for name in models.model_names():
    assert name in str(error.value)


# --- BatchNorm guard and cross-example check -----------------------------------------------------

class _BatchNormBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x))


class _CompactBatchNormModel(nn.Module):
  """BatchNorm two levels down, created inline in compact methods."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(NUM_CLASSES)(nn.relu(_BatchNormBlock()(x)))


class _SetupBatchNormModel(nn.Module):
  """BatchNorm in a submodule defined in setup."""

  def setup(self):
    self.block = _BatchNormBlock()
    self.head = nn.Dense(NUM_CLASSES)

  def __call__(self, x):
    return self.head(self.block(x.reshape((x.shape[0], -1))))


class _NormAttributeModel(nn.Module):
  """A norm layer passed in as an attribute."""

  norm: nn.Module

  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(self.norm(x.reshape((x.shape[0], -1))))


class _BatchMeanSubtractingModel(nn.Module):
  """Mixes examples without BatchNorm: subtracts the batch mean."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(NUM_CLASSES)(x - jnp.mean(x, axis=0, keepdims=True))


def _assert_rejected_as_batch_norm(fn, *args, **kwargs):
  with pytest.raises(models.BatchNormInDPModelError) as error:
    fn(*args, **kwargs)
  message = str(error.value)
  for phrase in ("BatchNorm", "per-example gradients", "DP guarantee", "GroupNorm or LayerNorm"):
    assert phrase in message
  assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("model_cls", [_CompactBatchNormModel, _SetupBatchNormModel])
def test_batch_norm_in_a_submodule_is_rejected(model_cls):
  model, images = model_cls(), _images((4, 4, 1))
  variables = _init(model, images)
  _assert_rejected_as_batch_norm(models.assert_dp_compatible, model, variables)
  # Found by tracing init even when only the params are at hand.
  params_only = {"params": variables["params"]}
  _assert_rejected_as_batch_norm(models.assert_dp_compatible, model, params_only, images)
  _assert_rejected_as_batch_norm(
      models.assert_dp_compatible, model,
      example_input=jax.ShapeDtypeStruct(images.shape, images.dtype))


def test_batch_norm_held_as_an_attribute_is_rejected_without_init():
  model = _NormAttributeModel(norm=nn.BatchNorm(use_running_average=True))
  _assert_rejected_as_batch_norm(models.assert_dp_compatible, model)
  layer_norm_model = _NormAttributeModel(norm=nn.LayerNorm())
  models.assert_dp_compatible(layer_norm_model, example_input=_images((2, 2, 1)))


def test_build_model_runs_the_batch_norm_check(monkeypatch):
  monkeypatch.setitem(
      registry._BUILDERS, "bad", lambda num_classes: (_CompactBatchNormModel(), (4, 4, 1)))
  _assert_rejected_as_batch_norm(models.build_model, "bad", NUM_CLASSES)


def test_batch_mean_subtraction_is_caught_as_mixing_examples():
  model, images = _BatchMeanSubtractingModel(), _images((4, 4, 1))
  variables = _init(model, images)
  models.assert_dp_compatible(model, variables, images)  # no BatchNorm to find ...
  with pytest.raises(models.BatchNormInDPModelError, match="mixes the examples"):
    models.assert_no_cross_example_dependence(model.apply, variables, images)  # ... but it mixes


def test_batch_norm_in_training_mode_is_caught_as_mixing_examples():
  model, images = _CompactBatchNormModel(), _images((4, 4, 1))
  variables = _init(model, images)

  def apply_in_training_mode(variables, batch):
    return model.apply(variables, batch, mutable=["batch_stats"])[0]

  with pytest.raises(models.BatchNormInDPModelError, match="mixes the examples"):
    models.assert_no_cross_example_dependence(apply_in_training_mode, variables, images)


def test_cross_example_check_needs_two_examples():
  model = _BatchMeanSubtractingModel()
  images = _images((4, 4, 1), batch=1)
  with pytest.raises(ValueError, match="at least 2"):
    models.assert_no_cross_example_dependence(
        model.apply, _init(model, images), images)


def test_vit_fused_and_einsum_attention_agree():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  outs = []
  for attention in ("fused", "einsum"):
    model = models.build_model("vit", num_classes=5, variant="Ti", patch_size=8, image_size=32,
                               depth=1, attention=attention)
    params = model.init(jax.random.PRNGKey(0), images)  # same names: the same params
    outs.append(model.apply(params, images))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="attention 'flash' is unknown"):
    models.build_model("vit", num_classes=5, variant="Ti", patch_size=8, image_size=32,
                       attention="flash")


@pytest.mark.parametrize("tokens", [17, 64, 65])
def test_padded_attention_equals_fused_attention_and_its_gradient(tokens):
  """The "cudnn" attention's padding and length masking (run here with XLA's kernel): the same
  output and gradients as attention over the unpadded tokens, whatever the padding."""
  q, k, v = jax.random.normal(jax.random.PRNGKey(2), (3, 2, tokens, 2, 8))
  padded = vit.padded_attention(implementation=None, multiple=64)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  np.testing.assert_allclose(padded(q, k, v), vit.fused_attention(q, k, v), atol=1e-5)
  for g_padded, g_fused in zip(jax.grad(loss(padded), (0, 1, 2))(q, k, v),
                               jax.grad(loss(vit.fused_attention), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_padded, g_fused, atol=1e-5)
  with pytest.raises(ValueError, match="no bias or mask"):
    padded(q, k, v, mask=jnp.ones((2, 1, tokens, tokens), bool))


def test_cudnn_attention_takes_cudnn_in_a_bfloat16_step_and_xla_at_float32_init(monkeypatch):
  """cuDNN refuses float32 ("Q must be fp16/bf16", seen on the H200): the float32 init takes
  XLA's kernel, and the bfloat16 step (`dpjax.train.step`'s cast) reaches cuDNN's. Recorded here
  by a stand-in that runs XLA's kernel whatever it is asked for."""
  asked = _record_attention_kernels(monkeypatch)
  model = models.build_model("vit", num_classes=5, variant="Ti", patch_size=8, image_size=16,
                             depth=1, attention="cudnn")
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  assert set(asked) == {("float32", None)}
  asked.clear()
  example = {"image": jnp.ones((16, 16, 3)), "label": jnp.int32(1)}
  jax.grad(step_lib.make_example_loss(model, "bfloat16"))(params, example)
  assert set(asked) == {("bfloat16", "cudnn")}


def _record_attention_kernels(monkeypatch) -> list:
  """Records (input dtype, implementation asked) of each jax.nn.dot_product_attention call, and
  runs XLA's kernel whatever was asked (this machine has no cuDNN)."""
  asked = []
  real = jax.nn.dot_product_attention

  def record(*args, implementation=None, **kwargs):
    asked.append((args[0].dtype.name, implementation))
    return real(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", record)
  return asked


@pytest.mark.parametrize("cudnn_runs", [False, True])
def test_auto_attention_takes_cudnn_only_where_it_runs(monkeypatch, cudnn_runs):
  """The default attention ("auto") asks for cuDNN's kernel where `cudnn_attention_runs` says it
  runs (a GPU's bfloat16 step) and XLA's everywhere else (the float32 init, a CPU run): the same
  function, so the logits equal "fused"'s."""
  monkeypatch.setattr(vit, "cudnn_attention_runs",
                      lambda dtype: cudnn_runs and jnp.dtype(dtype) == jnp.bfloat16)
  asked = _record_attention_kernels(monkeypatch)
  sizes = dict(num_classes=5, variant="Ti", patch_size=8, image_size=16, depth=1)
  model = models.build_model("vit", **sizes)
  assert model.attention == "auto"
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  assert set(asked) == {("float32", None)}
  fused = models.build_model("vit", attention="fused", **sizes)
  np.testing.assert_allclose(model.apply({"params": params}, images),
                             fused.apply({"params": params}, images), rtol=1e-5, atol=1e-6)
  asked.clear()
  example = {"image": images[0], "label": jnp.int32(1)}
  jax.grad(step_lib.make_example_loss(model, "bfloat16"))(params, example)
  assert set(asked) == {("bfloat16", "cudnn" if cudnn_runs else None)}


class _FakeDevice:
  def __init__(self, platform, capability=None):
    self.platform = platform
    if capability is not None:
      self.compute_capability = capability


@pytest.mark.parametrize("device, dtype, runs", [
    (_FakeDevice("gpu", "9.0"), jnp.bfloat16, True),    # H100 / H200
    (_FakeDevice("gpu", "8.0"), jnp.float16, True),     # A100
    (_FakeDevice("gpu", "9.0"), jnp.float32, False),    # cuDNN refuses float32
    (_FakeDevice("gpu", "7.0"), jnp.bfloat16, False),   # V100: no fused flash attention
    (_FakeDevice("gpu"), jnp.bfloat16, False),          # a GPU without a CUDA capability (ROCm)
    (_FakeDevice("cpu"), jnp.bfloat16, False),
    (_FakeDevice("tpu"), jnp.bfloat16, False)])
def test_cudnn_attention_runs_on_ampere_or_later_nvidia_gpus_in_half_precision(
    monkeypatch, device, dtype, runs):
  monkeypatch.setattr(jax, "devices", lambda *a: [device])
  assert vit.cudnn_attention_runs(dtype) is runs


def test_cudnn_attention_does_not_run_on_this_cpu():
  assert jax.devices()[0].platform == "cpu"
  assert not vit.cudnn_attention_runs(jnp.bfloat16)


@pytest.mark.parametrize("unroll", [1, 3])
def test_a_scanned_vit_computes_the_same_function(unroll):
  """scan_blocks=True stacks the blocks' params; with stack_blocks' params the logits agree
  (whatever the scan's unroll)."""
  sizes = dict(variant="Ti", patch_size=4, image_size=8, depth=3, width=16, num_heads=2,
               mlp_dim=32)
  plain = models.build_model("vit", num_classes=5, **sizes)
  scanned = models.build_model("vit", num_classes=5, scan_blocks=True, scan_unroll=unroll,
                               **sizes)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  params = plain.init(jax.random.PRNGKey(0), images)["params"]
  stacked = vit.stack_blocks(params, depth=3)
  shapes = jax.tree_util.tree_map(jnp.shape, scanned.init(jax.random.PRNGKey(0), images)["params"])
  assert jax.tree_util.tree_map(jnp.shape, stacked) == shapes
  assert shapes["blocks"]["mlp_in"]["kernel"] == (3, 16, 32)
  np.testing.assert_allclose(scanned.apply({"params": stacked}, images),
                             plain.apply({"params": params}, images), rtol=1e-5, atol=1e-6)
