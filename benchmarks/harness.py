"""Shared pieces of the benchmarks: models, the trainer's DP and non-DP steps, timing, memory.

The steps are the trainer's own (`dpjax.train.step` under a `dpjax.parallel` layout):
  DP step     = k × `accumulate` (per-example grads, clipping; m examples each; the first
                overwrites the last step's sum, `step.reuse_sum`) + `apply` (the devices'
                partial sums added, noise once, optimizer update);
  non-DP step = `public_grad` on the same k·m examples + `apply`.
Random data; examples/s is measured over windows of steps dispatched without synchronisation
(one `block_until_ready` per window), and the median over windows is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from benchmarks import timing
from dpjax import models, parallel
from dpjax.privacy import clipping, noise
from dpjax.train import step as step_lib

# name -> (build_model kwargs, image shape, classes)
MODELS: dict[str, tuple[dict, tuple[int, int, int], int]] = {
    "vit_b16_224": (dict(name="vit", variant="B", patch_size=16, image_size=224),
                    (224, 224, 3), 1000),
    # the longer sequence (T = 577) and the larger model of the performance issue
    "vit_b16_384": (dict(name="vit", variant="B", patch_size=16, image_size=384),
                    (384, 384, 3), 1000),
    "vit_l16_224": (dict(name="vit", variant="L", patch_size=16, image_size=224),
                    (224, 224, 3), 1000),
    "vit_s16_224": (dict(name="vit", variant="S", patch_size=16, image_size=224),
                    (224, 224, 3), 1000),
    # the CIFAR-sized ViT of the performance issue: patch 4, width 384, depth 6
    "vit_cifar": (dict(name="vit", variant="S", patch_size=4, image_size=32, depth=6),
                  (32, 32, 3), 10),
    "wrn_16_4": (dict(name="wrn_16_4"), (32, 32, 3), 10),
    "cnn_tanh": (dict(name="cnn_tanh_mnist"), (28, 28, 1), 10),
    "vit_test": (dict(name="vit", variant="Ti", patch_size=8, image_size=32, depth=2),
                 (32, 32, 3), 10),
}
CLIP_RULES = {"flat": lambda p: clipping.FlatClip(1.0),
              "automatic": lambda p: clipping.AutomaticClip(1.0, 0.01),
              "per_layer": lambda p: clipping.per_layer_clip(p, 1.0)}


def build_model(model_key: str, attention: str | None = None, scan_blocks: bool = False):
  """(model, params, image shape, classes) of `MODELS[model_key]`: the Flax model and its float32
  params initialised from PRNGKey(0). `attention`: another ViT attention than the default."""
  kwargs, shape, classes = MODELS[model_key]
  kwargs = dict(kwargs)
  if attention:
    kwargs["attention"] = attention
  if scan_blocks:
    kwargs["scan_blocks"] = True
  model = models.build_model(kwargs.pop("name"), num_classes=classes, input_shape=shape,
                             **kwargs)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1,) + shape, np.float32))
  return model, params["params"], shape, classes


def random_rows(rng: np.random.Generator, shape: tuple[int, ...], classes: int,
                n: int) -> dict[str, np.ndarray]:
  """n random examples: {image [n, *shape] float32 standard normal, label [n] int32}."""
  return dict(image=rng.standard_normal((n,) + shape).astype(np.float32),
              label=rng.integers(0, classes, n).astype(np.int32))


SPARSE = ("none", "rows", "instantiated")


def sparse_mask(params: Any, sparse: str, mesh) -> Any:
  """None, or the element mask of the fine-tuning studies' sparse runs (`dpjax.finetune.top_rows`:
  20% of the output rows of every kernel outside the head, random) on the mesh. "rows": the DP step
  keeps the masked kernels factored (`row_masks`, as the trainer does); "instantiated": the same
  mask with per-example gradients formed (ghost's path for element masks)."""
  if sparse not in SPARSE:
    raise ValueError(f"sparse must be one of {SPARSE}, got {sparse!r}.")
  if sparse == "none":
    return None
  from dpjax import finetune
  selection = jax.tree_util.tree_map(lambda p: True, params)
  mask = finetune.top_rows(finetune.random_rows(params, 0), params, selection, 0.2)
  return parallel.place(mask, mesh)


class Steps:
  """The DP and non-DP steps of one model on one mesh, with their random data and state."""

  def __init__(self, model_key: str, mesh, microbatch: int, microbatches: int, dtype: str,
               clip: str = "flat", attention: str | None = None, method: str = "vmap",
               scan_blocks: bool = False, sparse: str = "none"):
    model, params, shape, classes = build_model(model_key, attention, scan_blocks)
    self.num_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    self.batch = microbatch * microbatches
    rule = CLIP_RULES[clip](params)
    specs = parallel.state_specs(params, mesh)
    tx = noise.add_gaussian_noise(1.0, rule.sensitivity, float(self.batch),
                                  split=parallel.split_leaves(specs))
    optimizer = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = step_lib.OptState(tx.init(params), optimizer.init(params))
    self.mesh, self.layout = mesh, parallel.make_layout(mesh, params, opt_state)
    self.state = parallel.place(params, mesh), parallel.place(opt_state, mesh)
    example_loss = step_lib.make_example_loss(model, dtype)
    self.zero_sum = step_lib.make_zero_sum(rule, self.layout)
    batch_losses = step_lib.make_batch_losses(model, dtype) if method == "ghost" else None
    self.element_mask = sparse_mask(params, sparse, mesh)
    self.accumulate = step_lib.make_accumulate(example_loss, rule, layout=self.layout,
                                               grad_dtype=step_lib.grad_dtype(dtype),
                                               batch_losses=batch_losses,
                                               masked=sparse != "none", row_masks=sparse == "rows")
    self.total = step_lib.make_total(self.layout)  # not in the step: `scaling.py` times it alone
    self.public_grad = step_lib.make_public_grad(example_loss, self.layout)
    self.apply = step_lib.make_apply(tx, optimizer, self.layout, donate=True)
    rng = np.random.default_rng(0)

    def rows(n):
      return parallel.global_batch(mesh, random_rows(rng, shape, classes, n), n)

    self.params, self.batch_losses, self.rule = params, batch_losses, rule
    self.spent = None  # the DP step's last sum (`dp`)
    self.microbatches = [rows(microbatch) for _ in range(microbatches)]
    self.mask = parallel.global_batch(mesh, np.ones(microbatch, bool), microbatch)
    self.public = rows(self.batch)

  def dp(self, params, opt_state):
    # As the trainer does: the first microbatch overwrites the last step's sum (no zero sum).
    self.spent = step_lib.sum_microbatches(self.accumulate, self.zero_sum, self.spent, params,
                                           self.element_mask,
                                           ((b, self.mask) for b in self.microbatches))
    return self.apply(params, opt_state, None, self.spent.grad_sum, np.float32(0.0))[:2]

  def non_dp(self, params, opt_state):
    grad, _ = self.public_grad(params, self.public)
    return self.apply(params, opt_state, grad, None, np.float32(1.0))[:2]

  def pieces(self) -> dict[str, Callable[[], Any]]:
    """The parts of the two steps, each alone on the first microbatch: the non-DP gradient, the
    DP accumulate (per-example norms, clipping, clipped sum), the step's Gaussian noise for every
    parameter (`noise`: the exact-tail sampler) and, for ghost, its forward + backward pass to the
    layers' outputs (`ghost_backward`: the factored terms) and its norms (that pass + the norms)."""
    params = self.state[0]
    draw_noise = jax.jit(lambda key, p: noise.gaussian_noise_like(key, p, 1.0))
    key = jax.random.key_data(jax.random.key(0))  # a benchmark: any key times the same
    found = {"public_grad": lambda: self.public_grad(params, self.microbatches[0]),
             "accumulate": lambda: self.accumulate(self.zero_sum(params), params,
                                                   self.element_mask,
                                                   self.microbatches[0], self.mask,
                                                   np.bool_(True)),
             "noise": lambda: draw_noise(key, params)}
    if self.batch_losses is not None:
      from dpjax.privacy import ghost
      backward = jax.jit(lambda p, b: list(ghost.per_example_terms(
          self.batch_losses, p, b).values()))
      norms = jax.jit(lambda p, b: ghost.ghost_sq_norms(self.batch_losses, p, b))
      found["ghost_backward"] = lambda: backward(params, self.microbatches[0])
      found["ghost_norms"] = lambda: norms(params, self.microbatches[0])
    return found

  def time_pieces(self, repeats: int) -> dict[str, float]:
    """Median ms of each of `pieces()` (compiled first, `repeats` calls timed together)."""
    times = {}
    for name, piece in self.pieces().items():
      jax.block_until_ready(piece())
      start = time.perf_counter()
      for _ in range(repeats):
        out = piece()
      jax.block_until_ready(out)
      times[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / repeats
    return times

  def measure(self, name: str, windows: int, steps: int) -> dict[str, float]:
    """Compile time and median examples/s of `name` ('dp' or 'non_dp')."""
    step: Callable = getattr(self, name)

    def advance():
      self.state = step(*self.state)
      return self.state
    host: list[float] = []
    first_s, step_s = time_steps(advance, windows, steps, host)
    rate = self.batch / step_s
    # The host's share: seconds per step to dispatch a window's steps, before blocking. Close to
    # the step time, the host is what limits the rate (dispatch and argument handling).
    return {f"{name}_examples_per_s": rate, f"{name}_step_ms": 1e3 * step_s,
            f"{name}_dispatch_ms": 1e3 * statistics.median(host),
            f"{name}_compile_s": max(first_s - step_s, 0.0)}


def time_steps(advance: Callable[[], Any], windows: int, steps: int,
               host: list[float] | None = None) -> tuple[float, float]:
  """(seconds of the first call, median seconds per call) of `advance()`, which dispatches one
  step and returns its output: `timing.time_calls` waiting with `jax.block_until_ready`."""
  return timing.time_calls(advance, jax.block_until_ready, windows, steps, host)


def peak_memory_bytes(mesh) -> int:
  """The largest allocator peak over the mesh's devices; the process's max RSS on CPU."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
  if None in peaks:
    return timing.max_rss_bytes()
  return int(max(peaks))


def device_facts() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(device=device.device_kind, platform=device.platform, jax=jax.__version__)
