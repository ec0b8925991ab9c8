"""Tests for dpjax.parallel and the sharded steps, on 8 virtual CPU devices (tests/conftest.py).

The sharded DP step (per-example clipping over the mesh, one noise draw, optimizer update) must
give the single-device params for the conv, attention and dense models, for data-parallel and FSDP
layouts; its noise must have the single-device variance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dpjax import parallel
from dpjax.data import views as views_lib
from dpjax.privacy import clipping, noise
from dpjax.train import step as step_lib
from tests import toy_models

LAYOUTS = {"data8": (8, 1), "data4_fsdp2": (4, 2), "fsdp8": (1, 8)}


class _make_dp_step:
  """Builds the step functions once; `run` does two microbatches of private clipped sums, a
  public gradient, noise, mix and an Adam update, and returns (params, stats, device params)."""

  def __init__(self, model, layout_sizes, rule, ghost=False, views=None):
    params = toy_models.init(model)
    loss = (toy_models.per_example_loss(model) if views is None
            else step_lib.make_example_loss(model, views=views))
    tx, opt = noise.add_gaussian_noise(1.0, rule.sensitivity, 16.0, seed=3), optax.adam(0.1)
    opt_state = step_lib.OptState(tx.init(params), opt.init(params))
    layout = None
    self.put = lambda tree: tree
    if layout_sizes is not None:
      mesh = parallel.make_mesh(*layout_sizes)
      layout = parallel.make_layout(mesh, params, opt_state)
      params, opt_state = parallel.place(params, mesh), parallel.place(opt_state, mesh)
      self.put = lambda tree: parallel.global_batch(mesh, tree, 16)
    self.state = params, opt_state
    self.zero_sum = step_lib.make_zero_sum(rule, layout)
    batch_losses = None
    if ghost:
      batch_losses = (toy_models.batch_losses(model) if views is None
                      else step_lib.make_batch_losses(model, views=views))
    self.accumulate = step_lib.make_accumulate(loss, rule, layout=layout,
                                               batch_losses=batch_losses,
                                               views=1 if views is None else views.count)
    self.total = step_lib.make_total(layout)
    self.public_grad = step_lib.make_public_grad(loss, layout)
    self.apply = step_lib.make_apply(tx, opt, layout)

  def run(self, batch, mask, public):
    params, opt_state = self.state
    acc = self.zero_sum(params)
    for half in (slice(0, 16), slice(16, 32)):
      rows = self.put(jax.tree_util.tree_map(lambda x: x[half], batch))
      acc = self.accumulate(acc, params, None, rows, self.put(mask[half]),
                            np.bool_(half.start == 0))
    public_grad, _ = self.public_grad(params, self.put(public))
    self.clipped_sum = parallel.to_host(self.total(acc).grad_sum)
    params, opt_state, _ = self.apply(params, opt_state, public_grad, acc.grad_sum,
                                      np.float32(0.3))
    return parallel.to_host(params), parallel.to_host(acc.stats), params


def _dp_step(model, layout_sizes, rule, batch, mask, public):
  return _make_dp_step(model, layout_sizes, rule).run(batch, mask, public)


# Every layout for the conv model (where plain sharded jit went wrong), the mixed layout for the
# others: each case compiles the whole step, and 8 virtual devices share 2 cores.
CASES = [("conv", name) for name in sorted(LAYOUTS)] + [("attention", "data4_fsdp2"),
                                                         ("attention", "fsdp8"),
                                                         ("dense", "data4_fsdp2")]


@pytest.mark.parametrize("model_name,layout_name", CASES)
def test_sharded_dp_step_equals_single_device(model_name, layout_name):
  """DESIGN.md's sharp edge: sharded per-example grads of conv kernels once came out wrong."""
  model = toy_models.MODELS[model_name]
  batch = jax.tree_util.tree_map(np.asarray, toy_models.batch(32, seed=4, scale=3.0))
  public = jax.tree_util.tree_map(np.asarray, toy_models.batch(16, seed=5))
  mask = np.arange(32) < 27
  rule = clipping.FlatClip(0.5)
  single, single_stats, _ = _dp_step(model, None, rule, batch, mask, public)
  sharded, sharded_stats, placed = _dp_step(model, LAYOUTS[layout_name], rule, batch, mask, public)
  for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  for a, b in zip(single_stats, sharded_stats):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  if LAYOUTS[layout_name][1] > 1:  # FSDP really shards: some leaf is split over 'fsdp'
    specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(placed)]
    assert any("fsdp" in spec for spec in specs)


def test_per_layer_clipping_under_fsdp():
  model = toy_models.MODELS["conv"]
  params = toy_models.init(model)
  rule = clipping.per_layer_clip(params, 0.3)
  batch = jax.tree_util.tree_map(np.asarray, toy_models.batch(32, seed=1, scale=3.0))
  public = jax.tree_util.tree_map(np.asarray, toy_models.batch(16, seed=2))
  mask = np.ones(32, bool)
  single, _, _ = _dp_step(model, None, rule, batch, mask, public)
  sharded, _, _ = _dp_step(model, (2, 4), rule, batch, mask, public)
  for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _zero_sum(params, layout):
  """A zero clipped sum as `make_apply` takes it: per-device partial sums under a layout."""
  return step_lib.make_zero_sum(clipping.FlatClip(1.0), layout)(params).grad_sum


@pytest.mark.parametrize("layout_sizes", [None, (8, 1), (2, 4)])
def test_noise_is_drawn_once_per_global_step(layout_sizes):
  """Var of the noisy mean of a zero sum is (σ·S/B)², not n_devices times that."""
  sigma, sensitivity, batch_size = 2.0, 0.5, 4.0
  params = {"w": jnp.zeros((64, 64)), "b": jnp.zeros(64), "c": jnp.zeros(3)}
  layout, split = None, None
  if layout_sizes is not None:
    mesh = parallel.make_mesh(*layout_sizes)
    split = parallel.split_leaves(parallel.state_specs(params, mesh))  # as the trainer draws it
  tx = noise.add_gaussian_noise(sigma, sensitivity, batch_size, seed=11, split=split)
  state = step_lib.OptState(tx.init(params), optax.sgd(1.0).init(params))
  if layout_sizes is not None:
    layout = parallel.make_layout(mesh, params, state)
    params, state = parallel.place(params, mesh), parallel.place(state, mesh)
  apply = step_lib.make_apply(tx, optax.sgd(1.0), layout)
  new_params = apply(params, state, None, _zero_sum(params, layout), np.float32(0.0)).params
  draws = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
      parallel.to_host(new_params))])
  expected = (sigma * sensitivity / batch_size) ** 2
  # 4163 draws: the sample variance is within 10% of the truth with overwhelming probability
  # (its relative sd is sqrt(2/4160) = 2.2%); per-device noise would be 8x (or 2x) too large.
  assert abs(np.var(draws) / expected - 1) < 0.1
  assert abs(np.mean(draws)) < 5 * np.sqrt(expected / len(draws))


def test_noise_is_the_same_draw_whatever_the_layout():
  params = {"w": jnp.zeros((16, 8))}
  tx = noise.add_gaussian_noise(1.0, 1.0, 1.0, seed=5)
  draws = []
  for sizes in [None, (8, 1), (1, 8)]:
    p, state = params, step_lib.OptState(tx.init(params), optax.sgd(1.0).init(params))
    layout = None
    if sizes:
      mesh = parallel.make_mesh(*sizes)
      layout = parallel.make_layout(mesh, p, state)
      p, state = parallel.place(p, mesh), parallel.place(state, mesh)
    out, _, _ = step_lib.make_apply(tx, optax.sgd(1.0), layout)(
        p, state, None, _zero_sum(p, layout), np.float32(0))
    draws.append(parallel.to_host(out)["w"])
  np.testing.assert_allclose(draws[0], draws[1])
  np.testing.assert_allclose(draws[0], draws[2])


def test_split_leaves_get_their_noise_drawn_where_they_live():
  """With `split` from the layout, each device draws the noise of its own shards: no collective
  moves noise between devices. Cut from one flat draw, the split leaves would need them."""
  params = {"w": jnp.zeros((64, 32)), "v": jnp.zeros((64, 32)), "b": jnp.zeros(3)}
  mesh = parallel.make_mesh(1, 8)
  specs = parallel.state_specs(params, mesh)
  assert parallel.split_leaves(specs) == {"w": True, "v": True, "b": False}

  def collectives(split):
    tx = noise.add_gaussian_noise(1.0, 1.0, 1.0, split=split)
    state = step_lib.OptState(tx.init(params), optax.sgd(1.0).init(params))
    layout = parallel.make_layout(mesh, params, state)
    sharding = layout.sharding(layout.params)
    noisy = jax.jit(lambda g, s: tx.update(g, s)[0], in_shardings=(sharding, None),
                    out_shardings=sharding)
    hlo = noisy.lower(params, state.noise).compile().as_text()
    return sum(hlo.count(op) for op in ("all-to-all", "collective-permute", "all-gather"))
  assert collectives(parallel.split_leaves(specs)) == 0
  assert collectives(None) > 0  # the check can see it


def test_leaf_spec_shards_the_largest_divisible_float_dimension():
  assert parallel.leaf_spec((3, 3, 1, 8), jnp.float32, 4) == P(None, None, None, "fsdp")
  assert parallel.leaf_spec((768, 3072), jnp.float32, 2) == P(None, "fsdp")
  assert parallel.leaf_spec((3,), jnp.float32, 2) == P()
  assert parallel.leaf_spec((2,), jnp.uint32, 2) == P()  # PRNG keys stay replicated
  assert parallel.leaf_spec((), jnp.float32, 2) == P()
  assert parallel.leaf_spec((8, 8), jnp.float32, 1) == P()


def test_mesh_errors_are_clear():
  with pytest.raises(parallel.MeshError, match="only 8 are present"):
    parallel.make_mesh(16, 1)
  with pytest.raises(parallel.MeshError, match="does not divide the 8 devices"):
    parallel.make_mesh(-1, 3)
  with pytest.raises(parallel.MeshError, match="must be positive"):
    parallel.make_mesh(0, 1)
  mesh = parallel.make_mesh(4, 2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  with pytest.raises(parallel.MeshError, match="does not split evenly over the 8 devices"):
    parallel.check_divides(12, mesh, "perf.microbatch_size")
  with pytest.raises(parallel.MeshError, match="does not split evenly"):
    parallel.process_rows(mesh, 10)
  assert parallel.process_rows(mesh, 16) == slice(0, 16)  # one process holds every row


def test_config_agreement_is_a_no_op_for_one_process():
  parallel.check_same_config({"a": 1})


def test_a_second_sharded_step_compiles_nothing():
  """Every step function is built once: a DP step after the first must not trace or compile."""
  events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *args, **kwargs: events.append(name) if "compile" in name else None)
  model = toy_models.MODELS["dense"]
  batch = jax.tree_util.tree_map(np.asarray, toy_models.batch(32, seed=4))
  public = jax.tree_util.tree_map(np.asarray, toy_models.batch(16, seed=5))
  mask = np.ones(32, bool)
  steps = _make_dp_step(model, (4, 2), clipping.FlatClip(1.0))
  steps.run(batch, mask, public)
  assert events, "the listener saw no compilation at all"
  events.clear()
  steps.run(batch, mask, public)
  assert events == []


@pytest.fixture
def fake_distributed(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting a job."""
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
  monkeypatch.setattr(jax.config, "update", lambda *args: None)
  for name in ("DPJAX_COORDINATOR_ADDRESS", "DPJAX_NUM_PROCESSES", "DPJAX_PROCESS_ID",
               "DPJAX_DISTRIBUTED", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_distributed_start_up_explicit_detected_or_none(fake_distributed, monkeypatch):
  assert not parallel.initialize_distributed() and fake_distributed == []  # one process
  assert parallel.initialize_distributed("localhost:1234", 2, 1)
  assert fake_distributed[-1] == ("localhost:1234", 2, 1)
  monkeypatch.setenv("DPJAX_COORDINATOR_ADDRESS", "h:9")  # as launch/multiprocess.py sets
  monkeypatch.setenv("DPJAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("DPJAX_PROCESS_ID", "3")
  assert parallel.initialize_distributed() and fake_distributed[-1] == ("h:9", 4, 3)
  for name in ("DPJAX_COORDINATOR_ADDRESS", "DPJAX_NUM_PROCESSES", "DPJAX_PROCESS_ID"):
    monkeypatch.delenv(name)
  monkeypatch.setenv("SLURM_NTASKS", "16")  # srun: jax reads the rest from SLURM
  assert parallel.initialize_distributed() and fake_distributed[-1] == ()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not parallel.initialize_distributed()
  monkeypatch.setenv("DPJAX_DISTRIBUTED", "1")  # Cloud TPU pods (launch/tpu_pod.sh)
  assert parallel.initialize_distributed() and fake_distributed[-1] == ()


def test_distributed_start_up_refuses_an_incomplete_explicit_setting(fake_distributed):
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize_distributed("localhost:1234", 2)
  assert fake_distributed == []


@pytest.mark.parametrize("model_name,k", [("conv", 0), ("attention", 0), ("conv", 2)])
def test_sharded_ghost_dp_step_equals_single_device_vmap_step(model_name, k):
  """k > 0: augmentation multiplicity, k views per example (private and public rows), each
  device drawing its rows' views."""
  model = toy_models.MODELS[model_name]
  batch = jax.tree_util.tree_map(np.asarray, toy_models.batch(32, seed=4, scale=3.0))
  public = jax.tree_util.tree_map(np.asarray, toy_models.batch(16, seed=5))
  views = None
  if k:
    views = views_lib.Views("crop_flip", k, seed=0)
    batch = dict(batch, **step_lib.view_fields(32, step=7))
    public = dict(public, **step_lib.view_fields(16, step=7))
  mask = np.arange(32) < 27
  rule = clipping.FlatClip(0.5)
  vmap = _make_dp_step(model, None, rule, views=views)
  ghost = _make_dp_step(model, (4, 2), rule, ghost=True, views=views)
  _, single_stats, _ = vmap.run(batch, mask, public)
  _, sharded_stats, _ = ghost.run(batch, mask, public)
  # The clipped sums, not the Adam-updated params: Adam maps a gradient near 0 to ±lr, so float
  # rounding between two exact methods could flip an update.
  for a, b in zip(jax.tree_util.tree_leaves(vmap.clipped_sum),
                  jax.tree_util.tree_leaves(ghost.clipped_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(single_stats, sharded_stats):
    np.testing.assert_allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("layout_name", ["data4_fsdp2", "fsdp8"])
def test_a_row_masked_ghost_sum_is_the_same_on_an_fsdp_mesh(layout_name):
  """Sparse fine-tuning's masks (whole output rows, kept factored by ghost: `row_masks`) are split
  over 'fsdp' like the params; inside the step each device reads them whole."""
  model = toy_models.MODELS["conv"]
  params = toy_models.init(model)
  keys = iter(jax.random.split(jax.random.PRNGKey(5), 50))
  element_mask = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(
      jax.random.uniform(next(keys), w.shape[-1:]) < 0.5, w.shape).astype(jnp.float32), params)
  rule = clipping.FlatClip(0.5)
  batch, mask = toy_models.batch(16, seed=2, scale=3.0), jnp.arange(16) < 13

  def clipped_sum(layout_sizes):
    layout, p, m, put = None, params, element_mask, lambda tree: tree
    if layout_sizes is not None:
      mesh = parallel.make_mesh(*layout_sizes)
      layout = parallel.make_layout(mesh, params)
      p, m = parallel.place(params, mesh), parallel.place(element_mask, mesh)
      put = lambda tree: parallel.global_batch(mesh, tree, 16)
    accumulate = step_lib.make_accumulate(
        toy_models.per_example_loss(model), rule, layout=layout,
        batch_losses=toy_models.batch_losses(model), masked=True, row_masks=True)
    acc = accumulate(step_lib.make_zero_sum(rule, layout)(p), p, m, put(batch), put(mask),
                     np.bool_(True))
    return parallel.to_host(step_lib.make_total(layout)(acc).grad_sum)

  one, sharded = clipped_sum(None), clipped_sum(LAYOUTS[layout_name])
  for a, b, m in zip(*(jax.tree_util.tree_leaves(t) for t in (sharded, one, element_mask))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(a)[np.asarray(m) == 0] == 0)
