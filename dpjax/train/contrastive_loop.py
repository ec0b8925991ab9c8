"""Contrastive (SimCLR-style) pre-training with Logit-DP, the naive DP baseline or no privacy,
followed by linear probes of the learned representation.

Each step: a Poisson batch of private training images (rate q = dp.expected_batch_size / N),
padded to a multiple of perf.microbatch_size; two augmented views per image on the device
(`dpjax.data.augment`, randomness from (seed, step, image index)); the method's clipped gradient
sum (`dpjax.contrastive`); Gaussian noise of std σ·S once per step (S the method's sensitivity);
the optimizer. The ledger records every private step; the budget guard runs before each.

Privacy unit: one training image, i.e. both of its views; add/remove adjacency. Labels are never
read during pre-training. The naive method's sensitivity needs a largest batch
(`contrastive.max_batch_size`): a Poisson batch above it is released as noise only, which keeps
the change from adding or removing one image within (2·max − 1)·C. Logit-DP's bound holds for
every batch size (it is taken at n = N), so its batches are never cut.

The linear probes after training read labels non-privately, but never a private example
(`probe_data`): a probe of the pre-training dataset trains on the public part of its training split
if there is one, else on half of its test split and is scored on the other half; a probe of any
other dataset trains on its training split. They measure the representation; only their test
accuracy is reported.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import config as config_lib
from dpjax import contrastive, data, mixing, models, parallel, probe, provenance
from dpjax.data import augment
from dpjax.privacy import accounting, calibration, ghost, noise, randomness, sampling
from dpjax.train import engine, hooks, host_loop, plan as plan_lib, state as state_lib
from dpjax.train import statement as statement_lib, step as step_lib, train_state, workdir_lock

METHODS = config_lib.contrastive_block.METHODS  # the contrastive.method names
_AUGMENT_STREAM = 0xA06
_PROBE_SPLIT_SEED = 0x9B0E  # halves a test split for the pre-training dataset's probe


def default_block() -> ml_collections.ConfigDict:
  """The `contrastive` config block (experiments/contrastive.py sets it); its keys, defaults and
  meanings are `dpjax.config.ContrastiveSpec`'s."""
  return config_lib.default_contrastive_block()


def validate(config: ml_collections.ConfigDict) -> config_lib.RunSpec:
  """Raises ValueError for contrastive configs that cannot run correctly (`dpjax.config.parse`:
  every block's checks and the contrastive trainer's checks across blocks)."""
  if "contrastive" not in config:
    raise ValueError("The contrastive trainer needs a `contrastive` config block: set "
                     "config.contrastive = contrastive_loop.default_block().")
  return config_lib.parse(config)


def max_batch_size(config: ml_collections.ConfigDict, expected: float) -> int:
  """The naive method's largest batch: contrastive.max_batch_size, or E[n] + 5·sqrt(E[n]) rounded
  up to a multiple of perf.microbatch_size (a larger Poisson batch has probability < 1e-6)."""
  if config.contrastive.max_batch_size:
    return int(config.contrastive.max_batch_size)
  m = config.perf.microbatch_size
  return int(math.ceil((expected + 5 * math.sqrt(expected)) / m) * m)


def sensitivity(config: ml_collections.ConfigDict, num_private: int) -> float:
  """The method's L2 sensitivity under add/remove of one image (1.0, unused, when not DP)."""
  c, clip = config.contrastive, config.dp.clip_norm
  if c.method == "logit_dp":
    return contrastive.logit_dp_sensitivity(clip, c.temperature, num_private, "add_remove")
  if c.method == "naive":
    return contrastive.naive_sensitivity(
        clip, max_batch_size(config, config.dp.expected_batch_size), "add_remove")
  return 1.0


def plan_privacy(config: ml_collections.ConfigDict, num_private: int) -> plan_lib.PrivacyPlan:
  """Sampling rate, private steps and σ (calibrated to dp.target_epsilon when unset). Every step
  of a DP method is private; a method without DP has a plan without private steps."""
  dp, c = config.dp, config.contrastive
  private = c.method in ("logit_dp", "naive")
  steps = config.schedule.total_steps if c.method != "random_init" else 0
  q = dp.expected_batch_size / num_private
  if not 0 < q <= 1:
    raise ValueError(f"dp.expected_batch_size = {dp.expected_batch_size} must be in (0, "
                     f"{num_private}], the number of training images.")
  sigma = None
  if private and steps:
    accounting.check_delta(dp.delta, num_private)
    sigma = dp.noise_multiplier
    if sigma is None:
      sigma = calibration.calibrate_noise(dp.target_epsilon, dp.delta, q, steps, dp.accountant)
  clip = {"logit_dp": "Logit-DP pair clipping", "naive": "per-row clipping"}.get(c.method, "none")
  kind = "private" if private else "public"
  return plan_lib.PrivacyPlan(
      num_private if private else 0, float(dp.expected_batch_size), q, steps if private else 0,
      None if sigma is None else float(sigma), dp.delta, dp.accountant, dp.target_epsilon, clip,
      dp.clip_norm, sensitivity(config, num_private),
      phases=(plan_lib.Phase(kind, 0, steps),) if steps else ())


def create_model(config: ml_collections.ConfigDict, dataset: data.Dataset
                 ) -> tuple[models.ProjectedEncoder, Any]:
  """(encoder with projection head, params); refuses BatchNorm anywhere in it."""
  c = config.contrastive
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  backbone = models.build_model(config.model.name, num_classes=c.representation_dim,
                                input_shape=dataset.image_shape, **kwargs)
  model = models.ProjectedEncoder(backbone, c.hidden_dim, c.embedding_dim)
  variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed),
                                  jnp.zeros((1,) + dataset.image_shape, jnp.float32))
  models.assert_dp_compatible(model, variables)
  return model, variables["params"]


def make_mechanism(plan: plan_lib.PrivacyPlan, optimizer: optax.GradientTransformation
                   ) -> engine.Mechanism:
  """Noise of std σ·S on the clipped sum once per step (DP), or the plain sum (no DP), over the
  expected batch size, then the optimizer: the engine's apply step (`step.make_apply`), its noise
  key from the run's secret (the state's). The grad sum arrives whole (not per-device partial
  sums), so apply is jitted without a layout: GSPMD keeps the params' and state's shardings."""
  if plan.noise_multiplier is None:
    noise_tx = optax.scale(1.0 / plan.expected_batch_size)
  else:
    # One flat draw for every layout (no per-leaf split for FSDP): the same noise values as on
    # one device, so a mesh run reproduces a single-device run in the reproducible mode.
    noise_tx = noise.add_gaussian_noise(plan.noise_multiplier, plan.sensitivity,
                                        plan.expected_batch_size)
  return engine.Mechanism(noise_tx, step_lib.make_apply(noise_tx, optimizer, donate=True), None,
                          None)


def augment_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  a = config.contrastive.augment
  return dict(crop_scale=(a.crop_scale_min, 1.0), flip=a.flip, brightness=a.brightness,
              contrast=a.contrast, noise_std=a.noise_std)


def make_embed(model, dtype: str = "float32"):
  """embed(params, images[, ghost_variables]) -> embeddings [b, d] float32; with ghost variables,
  (embeddings, mutated variables) (`ghost.apply_model`). The encoder computes in `dtype`: params
  and images are cast inside, so gradients are w.r.t. the float32 params; both pair paths take
  norms and sums in float32 (the ghost path's factors from bounds that include the rounding of
  the model's dtype, `dpjax.contrastive_ghost`)."""
  compute = jnp.dtype(dtype)

  def embed(params, images, ghost_variables=None):
    cast = jax.tree_util.tree_map(lambda p: p.astype(compute), params)
    out = ghost.apply_model(model, cast, images.astype(compute), ghost_variables)
    emb = (out if ghost_variables is None else out[0])[0].astype(jnp.float32)
    return emb if ghost_variables is None else (emb, out[1])

  return embed


def make_grad_sum(model, config: ml_collections.ConfigDict):
  """(params, views_a, views_b, mask) -> ContrastiveSum for the config's method, the encoder
  computing in perf.dtype (`make_embed`)."""
  c, perf = config.contrastive, config.perf
  embed = make_embed(model, perf.get("dtype", "float32"))
  chunks = {"row_chunk": perf.get("row_chunk", 8),
            "jacobian_chunk": perf.get("jacobian_chunk") or None,
            "pair_method": c.get("pair_method", "jacobian")}
  if c.method == "logit_dp":
    fn = functools.partial(contrastive.logit_dp_grad_sum, pair_clip_norm=config.dp.clip_norm,
                           **chunks)
  elif c.method == "naive":
    fn = functools.partial(contrastive.naive_grad_sum, row_clip_norm=config.dp.clip_norm, **chunks)
  else:
    fn = contrastive.nonprivate_grad_sum
  return lambda params, a, b, mask: fn(embed, params, a, b, mask, temperature=c.temperature)


def make_grad_step(model, config: ml_collections.ConfigDict, layout: parallel.Layout):
  """The jitted (params, images [n, H, W, C] uint8, ids [n], mask [n], step) -> the method's
  clipped gradient sum (`make_grad_sum`) in the params' layout. Compiles once per padded batch
  size."""
  grad_sum = make_grad_sum(model, config)
  views_kw = augment_kwargs(config)
  base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _AUGMENT_STREAM)

  def step(params, images, ids, mask, step_index):
    images = images.astype(jnp.float32) / 255.0  # uint8 crosses to the device, as data.to_float
    views_a, views_b = augment.two_views(jax.random.fold_in(base_key, step_index), images, ids,
                                         **views_kw)
    return grad_sum(params, views_a, views_b, mask).grad_sum

  # The batch is replicated, not split over the mesh: with its rows split under plain jit, the
  # per-view Jacobians came out wrong (conv and dense layers alike, jax 0.10.2 CPU: DESIGN.md's
  # sharp edge; tests/contrastive_loop_test.py compares with one device). Every device computes
  # the whole sum; the params and optimizer state keep their layout (FSDP splits them).
  params_sharding = layout.sharding(layout.params)
  return jax.jit(step, in_shardings=(params_sharding,) + (layout.replicated,) * 4,
                 out_shardings=params_sharding)


def make_eval_loss(model, config: ml_collections.ConfigDict):
  """(params, images, ids) -> mean InfoNCE loss per image on fixed views (test images only)."""
  views_kw = augment_kwargs(config)
  key = jax.random.PRNGKey(12345)
  temperature = config.contrastive.temperature

  @jax.jit
  def loss(params, images, ids):
    views_a, views_b = augment.two_views(key, images, ids, **views_kw)
    embed = lambda x: model.apply({"params": params}, x)[0]
    sims = contrastive.similarities(embed(views_a), embed(views_b))
    return contrastive.info_nce_loss(sims, jnp.ones(len(ids), bool), temperature) / len(ids)

  return loss


def batch_for_step(sampler: sampling.PoissonSampler, step: int, capacity: int | None
                   ) -> sampling.PaddedBatch:
  """The step's padded Poisson batch. With a capacity (naive method) every batch has the same
  padded shape, `capacity` rounded up to whole microbatches; a batch of more than `capacity` real
  examples becomes all padding: the step releases noise only, so the sensitivity bound holds.
  Without, an empty draw is one microbatch of padding (the pair sums need rows to trace): its
  step, too, releases noise only."""
  batch = sampler.batch(step)
  if capacity is None:
    return batch if len(batch.mask) else sampling.pad_to_microbatches(
        batch.indices, sampler.microbatch_size, 1)
  microbatches = -(-capacity // sampler.microbatch_size)
  real = batch.indices[batch.mask] if batch.size <= capacity else np.zeros(0, np.int64)
  return sampling.pad_to_microbatches(real, sampler.microbatch_size, microbatches)


PROBES_STATEMENT = ("Linear probes of the encoder are trained without privacy but never on a "
                    "private example (on the pre-training dataset: its public part, else half of "
                    "its test split); only their test accuracy is reported, so they are "
                    "post-processing of the encoder and public or held-out data.")


def probe_data(name: str, config: ml_collections.ConfigDict, public: data.Dataset | None
               ) -> tuple[data.Dataset, data.Dataset, dict[str, str]]:
  """(probe train set, probe test set, what each is: with `{n}` for the count) for `name`.

  Privacy: no private example is read. The pre-training dataset's training split
  (config.data.name) is private, so its probe trains on `public` (the public part of that split)
  when there is one, else on one half of the test split, chosen at random by a fixed seed, and is
  tested on the other, disjoint half. Another dataset's training split is not private: used whole.
  """
  load = lambda split: state_lib.load_split(config, name, split)
  test = load("test")
  if name != config.data.name:
    return load("train"), test, dict(train="train split ({n} examples)",
                                     test="test split ({n} examples)")
  if public is not None and len(public) and not config.data.public_name:
    return public, test, dict(train="public part of the train split ({n} examples)",
                              test="test split ({n} examples)")
  train_idx, test_idx = data.public_private_split(len(test), 0.5, _PROBE_SPLIT_SEED)
  data.check_disjoint(train_idx, test_idx, ("probe train", "probe test"))
  return (test.subset(train_idx, "probe_train"), test.subset(test_idx, "probe_test"),
          dict(train="half of the test split ({n} examples; the train split is private)",
               test="the other half of the test split ({n} examples)"))


def run_probes(model, params, config: ml_collections.ConfigDict,
               public: data.Dataset | None = None
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
  """A linear probe of the representation on each of contrastive.probe.datasets.

  Returns ({name: {"test_accuracy"}}, {name: {"train", "test"}: what the probe read, with counts}).
  No probe reads a private example (`probe_data`). Only test accuracy is reported: a probe's fit
  to its own training set adds nothing about the representation.
  """
  p = config.contrastive.probe
  features_fn = jax.jit(lambda images: model.apply({"params": params}, images)[1])
  features = lambda images: probe.extract_features(features_fn, data.to_float(images),
                                                   batch_size=1000)
  results, read = {}, {}
  for name in [n.strip() for n in p.datasets.split(",") if n.strip()]:
    train, test, what = probe_data(name, config, public)
    n_train = min(p.train_examples or len(train), len(train))
    n_test = min(p.test_examples or len(test), len(test))
    fit = probe.linear_probe(
        features(train.images[:n_train]), train.labels[:n_train],
        features(test.images[:n_test]), test.labels[:n_test], num_classes=train.num_classes,
        l2=p.l2, steps=p.steps, learning_rate=p.learning_rate, seed=config.seed)
    results[name] = dict(test_accuracy=fit["test_accuracy"])
    read[name] = dict(train=what["train"].format(n=n_train), test=what["test"].format(n=n_test))
  return results, read


def _expected_config(config: ml_collections.ConfigDict) -> dict:
  """What a resumed run must share with its checkpoint: not contrastive.pair_method (how the same
  sum is computed), so checkpoints from before that key, or of the other method, resume."""
  block = {k: v for k, v in config.contrastive.to_dict().items() if k != "pair_method"}
  return dict(config_lib.trajectory_view(config), contrastive=block)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       show_progress: bool = True) -> dict[str, Any]:
  """Pre-trains as `config` says (resuming from `workdir`), probes, writes results.json. A workdir
  that another run holds is refused at once (`workdir_lock`); SIGTERM/SIGINT saves a checkpoint
  and returns stopped="preempted" (`host_loop`)."""
  run = host_loop.RunConfig(config, validate(config), workdir)
  with workdir_lock.for_this_process(workdir, parallel.is_main_process()):
    mesh = parallel.make_mesh(run.spec.mesh.data, run.spec.mesh.fsdp)
    parallel.check_divides(run.spec.perf.microbatch_size, mesh, "perf.microbatch_size")
    parts, test = state_lib.load_data(config)
    model, params = create_model(config, parts.private)
    return ContrastiveTrainer(run, (parts, test), model, params, mesh).run(show_progress)


class ContrastiveEvaluation(hooks.BaseHook):
  """The InfoNCE loss on fixed views of test images every `every` steps, with the ε spent."""
  name = "evaluation"

  def __init__(self, every: int):
    self.every = every

  def after_step(self, run, done):
    if hooks.due(done, self.every, run.total):
      run.watch.check(done, run.state.params)
      run.writer.write(done, "eval", dict(test_contrastive_loss=run.evaluate(run.state.params),
                                          epsilon=run.epsilon()))


class ContrastiveTrainer(host_loop.HostLoop):
  """Contrastive pre-training on the shared host loop: every step reads a Poisson batch of the
  (all private) training images; a DP method's steps are private steps of its plan."""

  def __init__(self, run: host_loop.RunConfig,
               data_parts: tuple[data.PublicPrivate, data.Dataset], model, params,
               mesh: jax.sharding.Mesh):
    config, spec = run.config, run.spec
    super().__init__(run, mesh, state_lib.create_optimizer(config), params)
    (self.parts, test), self.model = data_parts, model
    self.layout = parallel.make_layout(mesh, self.state.params, self.state.opt_state)
    self.grad_step = make_grad_step(model, config, self.layout)
    self.schedule = mixing.constant(0.0)  # every step reads the (private) training images
    self.replan(plan_privacy(config, len(self.parts.private)))
    if self.plan.noise_multiplier is None:
      self.budget = None  # no private step: nothing to guard
    self.capacity = (max_batch_size(config, self.plan.expected_batch_size)
                     if spec.contrastive.method == "naive" else None)
    eval_loss = make_eval_loss(model, config)
    rows = np.arange(min(spec.contrastive.eval_batch_size, len(test)))
    images, ids = jnp.asarray(data.to_float(test.images[rows])), jnp.asarray(rows, jnp.int32)
    self.evaluate = lambda p: float(eval_loss(p, images, ids))
    self.hooks = [ContrastiveEvaluation(spec.eval.every_steps),
                  hooks.Checkpointing(spec.checkpoint.every_steps)]

  def on_new_plan(self, plan: plan_lib.PrivacyPlan) -> None:
    self.mechanism = make_mechanism(plan, self.optimizer)

  def trajectory(self) -> dict:
    return _expected_config(self.config)

  def run(self, show_progress: bool) -> dict[str, Any]:
    if self.spec.contrastive.method == "random_init":
      self.total = 0  # no training: probes of the initial encoder
    return super().run(show_progress)

  def make_sampler(self) -> sampling.PoissonSampler:
    # Every method draws Poisson batches; a DP method's are its plan's sampling. Every row of a
    # batch is read (`one_step`), so a fixed capacity (dp.constant_time) makes the work constant.
    n, q, m = len(self.parts.private), self.plan.sampling_rate, self.spec.perf.microbatch_size
    capacity = sampling.capacity_microbatches(n, q, m) if self.spec.dp.constant_time else 0
    return sampling.PoissonSampler(n, q, m, seed=randomness.sampler_seed(self.secret),
                                   min_microbatches=capacity)

  def one_step(self, step: int) -> None:
    batch = batch_for_step(self.sampler, step, self.capacity)
    images, ids, mask = parallel.replicate_tree(
        (self.parts.private.images[batch.indices], batch.indices.astype(np.int32), batch.mask),
        self.mesh)
    state = self.state
    grad_sum = self.grad_step(state.params, images, ids, mask, np.int32(step))
    applied = self.mechanism.apply(state.params, state.opt_state, None, grad_sum,
                                   np.float32(0.0))
    self.state = train_state.TrainState(applied.params, applied.opt_state)
    if self.plan.noise_multiplier is not None:
      self.plan.record_private(self.ledger)
    else:
      self.ledger.record_public()

  def finish(self, step: int, stopped: str | None, seconds: float) -> dict[str, Any]:
    self.save(step)
    config, spec, params = self.config, self.spec, self.state.params
    private = self.plan.noise_multiplier is not None
    statement = statement_lib.privacy_statement(self.plan, self.ledger, config,
                                                noise.values_per_step(params), self.sampler)
    if self.capacity is not None and "step_work" in statement:
      k = -(-self.capacity // self.sampler.microbatch_size)
      statement["step_work"] = (
          f"constant: every private step runs {k} microbatches of "
          f"{self.sampler.microbatch_size} rows and reads every row (the naive method's "
          f"capacity of {self.capacity} examples: a larger batch becomes all padding)")
      statement.pop("timing_delta", None)
    statement["unit_of_privacy"] = ("one training image (both of its augmented views; labels "
                                    "are not read); add/remove adjacency")
    statement["probes"] = PROBES_STATEMENT
    probes, probe_read = run_probes(self.model, parallel.local_copy(params), config,
                                    self.parts.public)
    # test_accuracy: the first probe's (None without probes), which launch/sweep.py's tables
    # and plots read.
    first = next(iter(probes.values()), None)
    results = dict(method=spec.contrastive.method, temperature=spec.contrastive.temperature,
                   steps=step, stopped=stopped or "completed", train_seconds=seconds,
                   test_contrastive_loss=self.evaluate(params), privacy=statement,
                   probe=probes, probe_data=probe_read,
                   test_accuracy=None if first is None else first["test_accuracy"],
                   provenance=provenance.run_provenance())
    self.writer.write(step, "final", dict(test_contrastive_loss=results["test_contrastive_loss"],
                                          epsilon=statement["epsilon"],
                                          **{f"probe_{k}": v["test_accuracy"]
                                             for k, v in results["probe"].items()}))
    self.writer.close()
    if self.main:
      with open(os.path.join(self.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    self.say(statement_lib.format_statement(statement) if private else
             f"Privacy: none. Method {spec.contrastive.method!r} trains without clipping or "
             "noise, so this encoder has no differential-privacy guarantee.")
    self.say(f"  {PROBES_STATEMENT}")
    return results
