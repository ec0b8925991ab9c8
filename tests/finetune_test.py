"""Tests for dpjax.finetune and fine-tuning in the trainer: layer selections, frozen leaves (no
per-example gradients, zero update), element masks, SPARTA's private row selection."""

import functools

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import config as config_lib
from dpjax import finetune, models, pytrees
from dpjax.privacy import accounting, calibration, clipping, noise
from dpjax.train import checkpoint, loop
from dpjax.train import state as state_lib
from dpjax.train import step as step_lib
from dpjax.train import statement as statement_lib
from tests import toy_models
from tests.conftest import require_data
from tests.e2e_test import small_config


def _vit():
  model = models.build_model("vit", num_classes=3, variant="Ti", patch_size=4, image_size=8,
                             depth=2, width=16, num_heads=2, mlp_dim=32,
                             input_shape=toy_models.IMAGE_SHAPE)
  params = toy_models.init(model)
  return params, finetune.call_order(model, params, jnp.zeros((1,) + toy_models.IMAGE_SHAPE))


def _chosen(params, selection):
  return sorted("/".join(path) for path, keep in
                zip(pytrees.leaf_paths(selection), jax.tree_util.tree_leaves(selection)) if keep)


def test_selections_on_a_vit():
  params, order = _vit()
  assert order[:2] == ["patch_embedding", "embedding"] and order[-1] == "head"
  pick = lambda name, **kw: _chosen(params, finetune.select(params, name, order=order, **kw))
  assert pick("head") == ["head/bias", "head/kernel"]
  assert pick("last_blocks", num_blocks=1) == [p for p in pick("all") if p.startswith(
      ("block1/", "final_norm/", "head/"))]
  assert "block0/mlp_in/kernel" in pick("last_blocks", num_blocks=2)
  assert pick("last_blocks", num_blocks=0) == ["head/bias", "head/kernel"]
  norms = pick("head_norms")
  assert "block0/attention_norm/scale" in norms and "block0/mlp_in/kernel" not in norms
  attention = pick("attention")
  assert "block1/attention/query/kernel" in attention
  assert not any("norm" in p or "mlp" in p for p in attention)
  assert all(p.endswith("bias") or p.startswith("head/") for p in pick("bias"))
  assert pick("mlp") == sorted([p for p in pick("all") if "/mlp_in/" in p or "/mlp_out/" in p]
                               + ["head/bias", "head/kernel"])
  assert pick("patterns", patterns=r"^embedding/, query/kernel") == [
      "block0/attention/query/kernel", "block1/attention/query/kernel",
      "embedding/class_token", "embedding/position_embedding"]


def test_selections_on_a_wide_resnet():
  """last_blocks follows the call order (stage3_block2 is the last residual block, then the final
  GroupNorm and the head); BitFit takes WSConv and GroupNorm biases; attention / mlp are refused
  (the WRN has neither: they would train the head alone)."""
  model = models.build_model("wrn", num_classes=3, depth=10, width=1, num_groups=4,
                             input_shape=toy_models.IMAGE_SHAPE)
  params = toy_models.init(model)
  order = finetune.call_order(model, params, jnp.zeros((1,) + toy_models.IMAGE_SHAPE))
  assert order == ["first_conv", "stage1_block1", "stage2_block1", "stage3_block1",
                   "final_norm", "head"]
  pick = lambda name, **kw: _chosen(params, finetune.select(params, name, order=order, **kw))
  last = pick("last_blocks", num_blocks=1)
  assert {p.split("/")[0] for p in last} == {"stage3_block1", "final_norm", "head"}
  assert {p.split("/")[0] for p in pick("last_blocks", num_blocks=2)} == {
      "stage2_block1", "stage3_block1", "final_norm", "head"}
  bias = pick("bias")
  assert "stage1_block1/PreActivationConv_0/WSConv_0/bias" in bias
  assert "stage1_block1/PreActivationConv_0/GroupNorm_0/bias" in bias
  assert all(p.endswith("/bias") or p.startswith("head/") for p in bias)
  for name in ("attention", "mlp"):
    with pytest.raises(finetune.SelectionError, match=f"needs modules named '{name}"):
      finetune.select(params, name, order=order)


def test_bad_selections_are_refused_clearly():
  params, order = _vit()
  with pytest.raises(finetune.SelectionError, match="matches no parameter"):
    finetune.select(params, "patterns", patterns="no_such_layer")
  with pytest.raises(finetune.SelectionError, match="Unknown finetune selection"):
    finetune.select(params, "heads")
  with pytest.raises(finetune.SelectionError, match="does not fit|do not fit"):
    finetune.mask_updates(jax.tree_util.tree_map(lambda p: jnp.ones(p.shape[:-1] + (1,)),
                                                 params)).init(params)
  with pytest.raises(finetune.SelectionError, match=r"\(0, 1\]"):
    finetune.top_rows(finetune.magnitude_rows(params), params,
                      finetune.select(params, "all"), 1.5, order)


def _shapes_in(jaxpr) -> set:
  """Every intermediate's shape in a jaxpr and its sub-jaxprs (scan, pjit, custom_vjp…)."""
  found = set()
  for eqn in jaxpr.eqns:
    found.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found |= _shapes_in(inner)
  return found


def test_frozen_leaves_get_no_per_example_gradients():
  """The jaxpr of the clipped sum holds [m, *kernel] per-example gradients for trained kernels
  only: with the conv frozen, no array of shape [m, 3, 3, 1, 4] exists anywhere in it."""
  model = toy_models.MODELS["conv"]
  params = toy_models.init(model)
  loss = toy_models.per_example_loss(model)
  batch, mask = toy_models.batch(8), jnp.ones(8)
  frozen_shape = (8,) + params["Conv_0"]["kernel"].shape
  trained_shape = (8,) + params["Dense_0"]["kernel"].shape
  order = finetune.call_order(model, params, jnp.zeros((1,) + toy_models.IMAGE_SHAPE))
  assert order == ["Conv_0", "GroupNorm_0", "Dense_0"]  # names sort differently
  head = finetune.select(params, "head", order=order)
  shapes = lambda trainable: _shapes_in(jax.make_jaxpr(lambda p: clipping.clipped_grad_sum(
      loss, p, batch, mask, clipping.FlatClip(1.0), trainable=trainable))(params).jaxpr)
  assert frozen_shape in shapes(None)  # the check can see per-example conv gradients
  assert frozen_shape not in shapes(head) and trained_shape in shapes(head)


def test_masked_params_mask_the_gradient_and_equal_the_delta_form():
  """Training W with masked gradients and masked updates (the trainer's form) equals training ΔW
  in W = W₀ + M ⊙ ΔW, with SGD + momentum; masked elements never move."""
  model = toy_models.MODELS["dense"]
  w0 = toy_models.init(model)
  loss = lambda p, b: jnp.mean(jax.vmap(toy_models.per_example_loss(model), (None, 0))(p, b))
  batch = toy_models.batch(6, scale=2.0)
  mask = jax.tree_util.tree_map(
      lambda p: (jax.random.uniform(jax.random.PRNGKey(p.size), p.shape) < 0.5).astype(
          jnp.float32), w0)
  grad = jax.grad(lambda p: loss(finetune.masked_params(p, mask), batch))(w0)
  full = jax.grad(loss)(w0, batch)
  for g, f, m in zip(*map(jax.tree_util.tree_leaves, (grad, full, mask))):
    np.testing.assert_allclose(g, f * m, rtol=1e-6, atol=1e-8)

  opt = optax.sgd(0.5, momentum=0.9)
  masked_opt = optax.chain(opt, finetune.mask_updates(mask))
  w, state = w0, masked_opt.init(w0)
  delta = jax.tree_util.tree_map(jnp.zeros_like, w0)
  delta_state = opt.init(delta)
  for _ in range(3):
    g = jax.grad(lambda p: loss(finetune.masked_params(p, mask), batch))(w)
    updates, state = masked_opt.update(g, state, w)
    w = optax.apply_updates(w, updates)
    gd = jax.grad(lambda d: loss(finetune.delta_params(w0, d, mask), batch))(delta)
    updates, delta_state = opt.update(gd, delta_state, delta)
    delta = optax.apply_updates(delta, updates)
  for a, b in zip(jax.tree_util.tree_leaves(w),
                  jax.tree_util.tree_leaves(finetune.delta_params(w0, delta, mask))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b, m in zip(*map(jax.tree_util.tree_leaves, (w, w0, mask))):
    np.testing.assert_array_equal(np.where(m == 0, a, 0), np.where(m == 0, b, 0))


def test_top_rows_keep_the_best_rows_of_each_prunable_kernel():
  params, order = _vit()
  selection = finetune.select(params, "all")
  scores = finetune.magnitude_rows(params)
  mask = finetune.top_rows(scores, params, selection, 0.25, order)
  kernel = params["block0"]["mlp_in"]["kernel"]  # [16, 32]: 8 of 32 rows
  rows = np.asarray(mask["block0"]["mlp_in"]["kernel"][0])
  assert rows.sum() == 8
  np.testing.assert_array_equal(np.flatnonzero(rows),
                                np.sort(np.argsort(-np.abs(kernel).sum(0))[:8]))
  assert np.all(np.asarray(mask["head"]["kernel"]) == 1)  # the head trains whole
  assert np.all(np.asarray(mask["block0"]["mlp_in"]["bias"]) == 1)  # so do biases
  rows_of = finetune.prunable(params, selection, order)
  assert rows_of["block0"]["attention"]["query"]["kernel"]  # [width, heads, head_dim]
  for path in (("block0", "attention", "query", "bias"), ("embedding", "position_embedding")):
    leaf = functools.reduce(dict.__getitem__, path, params)
    assert leaf.ndim > 1 and not functools.reduce(dict.__getitem__, path, rows_of), path
    assert np.all(np.asarray(functools.reduce(dict.__getitem__, path, mask)) == 1), path
  fractions = finetune.kept_fraction(mask, params, selection, order)
  assert "head/kernel" not in fractions and fractions["block1/attention/query/kernel"] == 0.25


def test_every_sparse_mask_masks_whole_output_rows():
  """The trainer's ghost path keeps masked kernels factored on that promise (`is_row_mask`);
  a mask that varies along another axis is refused by name."""
  params, order = _vit()
  selection = finetune.select(params, "last_blocks", 1, order=order)
  masks = [finetune.top_rows(finetune.magnitude_rows(params), params, selection, 0.25, order),
           finetune.top_rows(finetune.random_rows(params, 0), params, selection, 0.5, order),
           finetune.warmup_mask(params, selection, order),
           finetune.selection_mask(params, selection)]
  for mask in masks:
    finetune.check_row_masks(mask)
  assert finetune.is_row_mask(np.array([0.0, 1.0])) and finetune.is_row_mask(np.float32(1))
  bad = jax.tree_util.tree_map(np.array, masks[0])
  bad["block1"]["mlp_in"]["kernel"][0, 0] = 1 - bad["block1"]["mlp_in"]["kernel"][0, 0]
  assert not finetune.is_row_mask(bad["block1"]["mlp_in"]["kernel"])
  with pytest.raises(finetune.SelectionError, match="block1/mlp_in/kernel"):
    finetune.check_row_masks(bad)


def test_a_sparse_method_whose_mask_is_not_whole_rows_is_refused(monkeypatch):
  """A mask method of one's own must keep to whole output rows: the trainer's ghost path keeps
  masked kernels factored on that promise."""
  from dpjax.config import registries
  params, order = _vit()
  def by_input_row(params, selection, trainable, order, sparse, seed):
    return jax.tree_util.tree_map(
        lambda p: ((np.arange(p.size) // p.shape[-1]) % 2).reshape(p.shape).astype(np.float32),
        params)
  monkeypatch.setitem(registries.SPARSE_MASKS.entries, "random", registries.Entry(by_input_row))
  config = small_config(finetune=dict(sparse=dict(method="random")))
  with pytest.raises(finetune.SelectionError, match="whole output rows.*head/kernel"):
    state_lib.finetuning(config, params, order)


def test_selection_scores_carry_the_steps_noise():
  """SPARTA's scores come from the step's own release: with zero clipped sums, each score is
  |N(0, (σ·C)²)| / B — mean σ·C·√(2/π) / B — from the noise the ledger accounts for."""
  sigma, clip, batch = 2.0, 0.5, 64.0
  params = {"w": jnp.zeros((200, 500))}
  tx = noise.add_gaussian_noise(sigma, clip, batch, seed=3)
  opt = optax.chain(optax.sgd(1.0), finetune.mask_updates({"w": jnp.ones((200, 500))}))
  opt_state = step_lib.OptState(tx.init(params), opt.init(params))
  scored, released = step_lib.make_score(tx)(opt_state, params)
  assert released is None  # no clip count without a ClipCountRelease
  scores = np.asarray(finetune.find_mask_state(scored.base).scores["w"])
  np.testing.assert_allclose(scores.mean(), sigma * clip * np.sqrt(2 / np.pi) / batch, rtol=0.01)
  assert int(scored.noise.count) == 1  # the noise key moved on, as after a training step


# ------------------------------------------------------------------------------------------------
# In the trainer (real data)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, dataset_cache):
  require_data()
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  loop.train_and_evaluate(small_config(schedule=dict(total_steps=6, public_batch_size=128),
                                       mixing=dict(switch_step=6)), workdir, show_progress=False)
  return workdir


def _finetune_config(pretrained, steps, **finetune_block):
  return small_config(schedule=dict(total_steps=steps, public_batch_size=128),
                      mixing=dict(switch_step=0), finetune=dict(init_from=pretrained,
                                                                **finetune_block))


def _final_params(config, workdir):
  return loop.load_trained_state(config, workdir)[0]


def test_head_only_fine_tuning_leaves_every_other_leaf_exactly_as_pretrained(pretrained, tmp_path):
  config = _finetune_config(pretrained, 4, selection="head")
  r = loop.train_and_evaluate(config, str(tmp_path), show_progress=False)
  before = _final_params(small_config(schedule=dict(total_steps=6, public_batch_size=128),
                                      mixing=dict(switch_step=6)), pretrained)
  after = _final_params(config, str(tmp_path))
  for module in ("conv1", "conv2", "fc1"):
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(after[module][name], before[module][name])
  assert not np.allclose(after["fc2"]["kernel"], before["fc2"]["kernel"])
  assert r["finetune"]["trainable_params"] == after["fc2"]["kernel"].size + after["fc2"]["bias"].size
  assert r["privacy"]["private_steps"] == 4


def test_sparta_run_accounts_every_private_step_and_trains_only_selected_rows(pretrained, tmp_path):
  config = _finetune_config(pretrained, 7, sparse=dict(method="sparta", fraction=0.25,
                                                       warmup_steps=2, selection_steps=2))
  r = loop.train_and_evaluate(config, str(tmp_path), show_progress=False)
  # ε of every private step, selection steps included, straight from dp_accounting.
  privacy = r["privacy"]
  assert privacy["private_steps"] == 7
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      privacy["sampling_rate"], dp_accounting.GaussianDpEvent(privacy["noise_multiplier"])), 7)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(event)
  assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(privacy["delta"]), rel=1e-9)
  assert privacy["epsilon"] <= config.dp.target_epsilon
  # Prunable kernels: frozen in warm-up, untouched while scoring, then only the chosen rows move.
  before = _final_params(small_config(schedule=dict(total_steps=6, public_batch_size=128),
                                      mixing=dict(switch_step=6)), pretrained)
  after = _final_params(config, str(tmp_path))
  assert r["finetune"]["kept_fraction"] == {"conv1/kernel": 0.25, "conv2/kernel": 0.25,
                                           "fc1/kernel": 0.25}
  for module in ("conv1", "conv2", "fc1"):
    moved = np.any(after[module]["kernel"] != before[module]["kernel"],
                   axis=tuple(range(before[module]["kernel"].ndim - 1)))
    assert 0 < moved.sum() <= 0.25 * moved.size
  assert not np.allclose(after["fc2"]["kernel"], before["fc2"]["kernel"])  # the head trains


def test_fine_tuning_errors_are_clear(pretrained, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
    loop.train_and_evaluate(_finetune_config(str(tmp_path / "nothing"), 2), str(tmp_path / "a"),
                            show_progress=False)
  wrong_model = _finetune_config(pretrained, 2)
  wrong_model.model.name = "wrn"
  wrong_model.model.depth, wrong_model.model.width = 10, 1
  with pytest.raises(checkpoint.CheckpointError, match="do not fit this model"):
    loop.train_and_evaluate(wrong_model, str(tmp_path / "b"), show_progress=False)


def test_sparse_fine_tuning_with_ghost_clipping_trains_like_vmap(pretrained, tmp_path):
  """perf.per_example_method is a perf flag under element masks too: same privacy event, same
  model up to rounding (ghost keeps the masked kernels factored: the masks are whole rows)."""
  runs = {}
  for method in ("vmap", "ghost"):
    config = _finetune_config(pretrained, 3, sparse=dict(method="sparta", fraction=0.25,
                                                         warmup_steps=1, selection_steps=1))
    config.perf.per_example_method = method
    config.dp.insecure_reproducible_seed = 0  # the two runs are compared: the same noise
    runs[method] = (loop.train_and_evaluate(config, str(tmp_path / method), show_progress=False),
                    _final_params(config, str(tmp_path / method)))
  assert runs["ghost"][0]["privacy"] == runs["vmap"][0]["privacy"]
  assert runs["ghost"][0]["finetune"] == runs["vmap"][0]["finetune"]
  for x, y in zip(jax.tree_util.tree_leaves(runs["vmap"][1]),
                  jax.tree_util.tree_leaves(runs["ghost"][1])):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Composition across runs: a run started from another run's params composes its ledger


def _private_config(steps, sigma=2.0, target=None, **finetune_block):
  """All-private steps on 5,400 private examples (q = 128/5400) at a fixed σ, or calibrated to
  `target`; PLD at the project's discretisation."""
  return small_config(data=dict(train_examples=6000),
                      schedule=dict(total_steps=steps, public_batch_size=128),
                      mixing=dict(switch_step=0), finetune=finetune_block,
                      dp=dict(accountant="pld", noise_multiplier=sigma, target_epsilon=target))


def _gaussian_steps(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _run_event(privacy):
  """A run's own private steps, from its statement."""
  return _gaussian_steps(privacy["sampling_rate"], privacy["noise_multiplier"],
                         privacy["private_steps"])


def _pld_epsilon(*events):
  """ε at δ = 1e-5 of the runs' events composed, straight from dp_accounting."""
  accountant = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=accounting.PLD_DISCRETIZATION)
  return accountant.compose(dp_accounting.ComposedDpEvent(list(events))).get_epsilon(1e-5)


@pytest.fixture(scope="module")
def private_run(tmp_path_factory, dataset_cache):
  """(workdir, privacy statement) of 3 private steps on Fashion-MNIST at σ = 1.5 (ε ≈ 0.21)."""
  require_data()
  workdir = str(tmp_path_factory.mktemp("private_source"))
  return workdir, loop.train_and_evaluate(_private_config(3, sigma=1.5), workdir,
                                          show_progress=False)["privacy"]


def test_fine_tuning_composes_the_source_runs_ledger_transitively(private_run, tmp_path):
  a_dir, a = private_run
  b = loop.train_and_evaluate(_private_config(2, init_from=a_dir), str(tmp_path / "b"),
                              show_progress=False)["privacy"]
  b_alone = accounting.epsilon(2.0, b["sampling_rate"], 2, 1e-5, "pld")
  assert b["private_steps"] == 2 and b["epsilon_this_run"] == pytest.approx(b_alone)
  assert b["epsilon"] == pytest.approx(_pld_epsilon(_run_event(a), _run_event(b)),
                                       rel=1e-6)
  assert b["epsilon"] > max(b_alone, a["epsilon"])
  assert b["composed_from"] == dict(workdir=a_dir, declared_public=False, private_steps=3,
                                    epsilon_alone=pytest.approx(a["epsilon"]), source_delta=1e-5,
                                    composed_at_delta=1e-5)
  assert "composed at this run's δ with the 3 private steps" in statement_lib.format_statement(b)
  # Rerunning resumes B from its final checkpoint, whose ledger holds the same prior.
  again = loop.train_and_evaluate(_private_config(2, init_from=a_dir), str(tmp_path / "b"),
                                  show_progress=False)["privacy"]
  assert again == b
  # Declared public: the source's steps are not composed, and the statement says so.
  public = loop.train_and_evaluate(_private_config(2, init_from=a_dir, init_from_public=True),
                                   str(tmp_path / "public"), show_progress=False)["privacy"]
  assert public["epsilon"] == b_alone
  assert public["composed_from"] == dict(workdir=a_dir, declared_public=True)
  # A chain composes every run in it: C from B from A.
  c = loop.train_and_evaluate(_private_config(1, init_from=str(tmp_path / "b")),
                              str(tmp_path / "c"), show_progress=False)["privacy"]
  assert c["epsilon"] == pytest.approx(_pld_epsilon(_run_event(a), _run_event(b),
                                                    _run_event(c)), rel=1e-6)
  assert c["composed_from"]["private_steps"] == 5
  assert c["composed_from"]["epsilon_alone"] == pytest.approx(b["epsilon"])


def test_the_target_is_the_total_budget_of_the_composition(private_run, tmp_path):
  a_dir, a = private_run
  # Calibrated: the composition of A and B lands on the target, B's σ is larger than alone.
  target = a["epsilon"] + 0.5
  b = loop.train_and_evaluate(_private_config(2, sigma=None, target=target, init_from=a_dir),
                              str(tmp_path / "calibrated"), show_progress=False)["privacy"]
  assert 0.99 * target <= b["epsilon"] <= target
  assert b["epsilon"] == pytest.approx(_pld_epsilon(_run_event(a), _run_event(b)),
                                       rel=1e-6)
  assert b["noise_multiplier"] > calibration.calibrate_noise(target, 1e-5, b["sampling_rate"], 2)
  # A fixed σ with a target: the guard stops B before the composition would exceed it.
  composed = lambda steps: _pld_epsilon(_run_event(a),
                                        _gaussian_steps(b["sampling_rate"], 2.0, steps))
  target = (composed(2) + composed(3)) / 2
  r = loop.train_and_evaluate(_private_config(5, target=target, init_from=a_dir),
                              str(tmp_path / "guarded"), show_progress=False)
  assert r["stopped"] == "budget" and r["privacy"]["private_steps"] == 2
  assert r["privacy"]["epsilon"] == pytest.approx(composed(2), rel=1e-6)
  assert r["privacy"]["epsilon"] <= target < composed(3)
  # A source that already spent the target is refused before training.
  with pytest.raises(ValueError, match="already spent"):
    loop.train_and_evaluate(_private_config(2, target=0.9 * a["epsilon"],
                                            init_from=a_dir),
                            str(tmp_path / "refused"), show_progress=False)


def test_composition_errors_are_clear(private_run, pretrained, tmp_path):
  a_dir, _ = private_run
  smaller_delta = _private_config(2, init_from=a_dir)
  smaller_delta.dp.delta = 1e-6
  with pytest.raises(ValueError, match="above this run's dp.delta"):
    loop.train_and_evaluate(smaller_delta, str(tmp_path / "delta"), show_progress=False)
  with pytest.raises(ValueError, match="init_from is empty"):
    config_lib.validate(_private_config(2, init_from_public=True))
  # A resumed run whose source has trained further since it started is refused.
  source = state_lib.read_source(_private_config(2, init_from=a_dir))
  moved = accounting.PrivacyLedger(prior=source.ledger)
  moved.record_private(0.01, 1.0)
  state_lib.check_resumed_prior(state_lib.starting_ledger(source), source)
  with pytest.raises(checkpoint.CheckpointError, match="trained further"):
    state_lib.check_resumed_prior(accounting.PrivacyLedger(prior=moved), source)
  # A source without private steps (the public pre-training) composes to nothing.
  # (_finetune_config splits Fashion-MNIST as `pretrained` did; _private_config's 6,000 examples
  # are split otherwise, which the next test refuses.)
  assert state_lib.read_source(_finetune_config(pretrained, 2)).ledger is None


@pytest.mark.parametrize("change", [dict(seed=1), dict(data=dict(public_fraction=0.2)),
                                    dict(data=dict(public_classes=(0, 1)))])
def test_a_source_whose_public_part_may_be_this_runs_private_data_is_refused(pretrained, change):
  """The public pre-training saw its public part without DP: a run that splits the same dataset
  otherwise (another seed, fraction or classes) could hold those examples in its private part."""
  config = _finetune_config(pretrained, 2)
  for block, values in change.items():
    config[block].update(values) if isinstance(values, dict) else setattr(config, block, values)
  with pytest.raises(ValueError, match="its private part can hold examples that run saw without"):
    state_lib.read_source(config)
  config.finetune.init_from_public = True  # declared public: the user's statement, not checked
  assert state_lib.read_source(config).declared_public
  assert state_lib.read_source(_private_config(2, init_from=pretrained, init_from_public=True))
  with pytest.raises(ValueError, match="data.train_examples=0; this run splits it with"):
    state_lib.read_source(_private_config(2, init_from=pretrained))  # the first 6,000 only
  other_data = _finetune_config(pretrained, 2)
  other_data.data.name = "mnist"  # another dataset: its public part is not this run's data
  other_data.seed = 1
  assert state_lib.read_source(other_data).ledger is None
