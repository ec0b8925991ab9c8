"""The noisy clip fraction (dp.clip_fraction_noise): its noise, its key, its sensitivity, its
accounting as one Gaussian of σ_eff = (σ⁻² + σ_c⁻²)^(-1/2), and what the trainer logs."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import config as config_lib
from dpjax import finetune, parallel
from dpjax.privacy import accounting, calibration, clipping, noise, randomness
from dpjax.train import loop, metrics, state as state_lib, step as step_lib
from dpjax.train import plan as plan_lib
from dpjax.train import statement as statement_lib
from tests import toy_models
from tests.conftest import require_data
from tests.e2e_test import small_config
from tests.privacy_randomness_test import ALLOWED_RECORD_KEYS

RULES = {"flat": lambda p: clipping.FlatClip(2.0),
         "per_layer": lambda p: clipping.per_layer_clip(p, 2.0),
         "automatic": lambda p: clipping.AutomaticClip(2.0),
         "normalized": lambda p: clipping.NormalizedClip(2.0)}


# ------------------------------------------------------------------------------------------------
# The mechanism: the count's sensitivity, its noise and its key.


@pytest.mark.parametrize("name", sorted(RULES))
def test_the_count_adds_one_flag_per_real_example(name):
  """num_clipped is the number of real examples with pre-clip norm > the clip norm (per-layer:
  any group above its C_g), against a loop over examples; padding adds nothing (the padded row
  here would be clipped), and removing any one example changes the count by 0 or 1:
  sensitivity 1."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  loss = toy_models.per_example_loss(model)
  rule = RULES[name](params)
  scales = jnp.array([0.0, 1e-3, 0.3, 1.0, 3.0, 30.0, 1e4, 1e4])[:, None, None, None]
  examples = toy_models.batch(8, seed=2)
  examples["image"] = examples["image"] * scales
  mask = np.arange(8) < 7
  count = lambda m: float(clipping.clipped_grad_sum(loss, params, examples, m, rule,
                                                    microbatch_size=4).stats.num_clipped)
  expected = 0
  for i in range(7):
    grad = jax.grad(loss)(params, jax.tree_util.tree_map(lambda x: x[i], examples))
    if isinstance(rule, clipping.GroupClip):
      groups = {}
      for name, leaf in zip(jax.tree_util.tree_leaves(rule.groups(grad)),
                            jax.tree_util.tree_leaves(grad)):
        groups.setdefault(name, []).append(leaf)
      expected += any(float(clipping.global_norm(g)) > rule.clip_norms[n]
                      for n, g in groups.items())
    else:
      expected += float(clipping.global_norm(grad)) > 2.0
  assert 0 < expected < 7  # the batch has examples on both sides of the clip norm
  assert count(mask) == expected
  for i in range(7):
    assert count(mask & (np.arange(8) != i)) in (expected, expected - 1)


def test_released_count_has_noise_std_sigma_c():
  """20,000 releases of one count (one per noise key): the sample std is within 3% of σ_c and
  the mean within 5 standard errors of the count. The std's relative sd is 1/√40000 = 0.5%, so
  either check fails by chance with probability < 1e-6; the keys are fixed."""
  release = noise.ClipCountRelease(stddev=4.0, expected_batch_size=64.0)
  keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
  draws = np.asarray(jax.vmap(lambda k: release.noisy_count(
      jnp.float32(17.0), noise.NoiseState(k, jnp.int32(0))))(keys), np.float64)
  assert abs(draws.std() / 4.0 - 1) < 0.03
  assert abs(draws.mean() - 17.0) < 5 * 4.0 / np.sqrt(len(draws))


def test_apply_releases_the_noisy_fraction_of_the_steps_count():
  """The jitted apply, called step after step on one batch's clipped sum (the key moves on each
  time): the fraction's mean is num_clipped / B and its std σ_c / B (400 steps: the std's
  relative sd is 3.5%, so a 20% miss has probability < 1e-7; fixed seeds). Public steps and an
  apply without a ClipCountRelease release nothing."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  rule = clipping.FlatClip(0.5)
  accumulate = step_lib.make_accumulate(toy_models.per_example_loss(model), rule)
  acc = accumulate(step_lib.make_zero_sum(rule)(params), params, None,
                   toy_models.batch(16, seed=1, scale=3.0), jnp.arange(16) < 12, np.bool_(True))
  num_clipped, b, sigma_c = float(acc.stats.num_clipped), 16.0, 2.0
  assert 0 < num_clipped <= 12
  tx, opt = noise.add_gaussian_noise(1.0, rule.sensitivity, b, seed=0), optax.sgd(0.0)
  apply = step_lib.make_apply(tx, opt, clip_count=noise.ClipCountRelease(sigma_c, b))
  state = step_lib.OptState(tx.init(params), opt.init(params))
  fractions = []
  for _ in range(400):
    _, state, released = apply(params, state, None, acc.grad_sum, np.float32(0.0),
                               acc.stats.num_clipped)
    fractions.append(float(released))
  assert abs(np.mean(fractions) - num_clipped / b) < 5 * sigma_c / b / np.sqrt(400)
  assert abs(np.std(fractions) / (sigma_c / b) - 1) < 0.2
  assert apply(params, state, acc.grad_sum, None, np.float32(1.0))[2] is None  # public step
  plain = step_lib.make_apply(tx, opt)
  assert plain(params, state, None, acc.grad_sum, np.float32(0.0), acc.stats.num_clipped)[2] is None
  with pytest.raises(ValueError, match="num_clipped"):
    apply(params, state, None, acc.grad_sum, np.float32(0.0))


def test_the_counts_noise_key_is_none_of_the_gradients_keys():
  """The count's key comes from the secret noise state (not the config seed) and is never a key
  that draws the gradient's noise or the next step's."""
  state = noise.init_noise_state(randomness.noise_key(randomness.fixed_secret(7)))
  step_key, next_key = jax.random.split(state.key)
  gradient_keys = [step_key, next_key, *jax.random.split(step_key),
                   *jax.random.split(jax.random.split(step_key)[1], 4)]
  count_key = tuple(np.asarray(noise.count_noise_key(state)))
  assert all(count_key != tuple(np.asarray(k)) for k in gradient_keys)
  assert count_key != tuple(np.asarray(jax.random.PRNGKey(7)))  # nor the seed's key
  # The same state gives the same draw; another (secret) key another one.
  release = noise.ClipCountRelease(1.0, 8.0)
  other = noise.init_noise_state(randomness.noise_key(randomness.fixed_secret(8)))
  assert float(release.noisy_count(3.0, state)) == float(release.noisy_count(3.0, state))
  assert float(release.noisy_count(3.0, state)) != float(release.noisy_count(3.0, other))


def test_sharded_apply_and_score_release_the_single_device_value():
  """Under a mesh the count is released once per global step, from the replicated key: the same
  value as without a layout; SPARTA's score releases it from the same key as apply."""
  params = {"w": jnp.zeros((8, 4))}
  tx = noise.add_gaussian_noise(1.0, 1.0, 8.0, seed=5)
  release = noise.ClipCountRelease(3.0, 8.0)
  count = jnp.float32(5.0)
  state = step_lib.OptState(tx.init(params), optax.sgd(1.0).init(params))
  single = step_lib.make_apply(tx, optax.sgd(1.0), clip_count=release)
  expected = float(single(params, state, None, params, np.float32(0.0), count)[2])
  mesh = parallel.make_mesh(8, 1)
  layout = parallel.make_layout(mesh, params, state)
  placed, placed_state = parallel.place(params, mesh), parallel.place(state, mesh)
  partial = step_lib.make_zero_sum(clipping.FlatClip(1.0), layout)(placed).grad_sum
  sharded = step_lib.make_apply(tx, optax.sgd(1.0), layout, clip_count=release)
  got = sharded(placed, placed_state, None, partial, np.float32(0.0),
                parallel.replicate(np.float32(5.0), mesh))[2]
  assert float(got) == pytest.approx(expected, rel=1e-6)
  opt = optax.chain(optax.sgd(1.0),
                    finetune.mask_updates(jax.tree_util.tree_map(jnp.ones_like, params)))
  score_state = step_lib.OptState(tx.init(params), opt.init(params))
  _, scored = step_lib.make_score(tx, clip_count=release)(score_state, params, count)
  assert float(scored) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Accounting.


def test_effective_noise_multiplier_and_its_inverse():
  assert calibration.effective_noise_multiplier(1.3, 0.0) == 1.3  # not released: σ exactly
  assert calibration.effective_noise_multiplier(1.0, 1.0) == pytest.approx(2 ** -0.5)
  assert calibration.effective_noise_multiplier(3.0, 4.0) == pytest.approx(12 / 5)
  sigma = calibration.gradient_noise_multiplier(12 / 5, 4.0)
  assert sigma == pytest.approx(3.0)
  assert calibration.gradient_noise_multiplier(0.8, 0.0) == 0.8
  for count_noise in (2.4, 1.0):  # σ_c ≤ σ_eff: the count alone would spend the budget
    with pytest.raises(ValueError, match="clip_fraction_noise"):
      calibration.gradient_noise_multiplier(2.4, count_noise)
  with pytest.raises(ValueError):
    calibration.effective_noise_multiplier(1.0, -1.0)


def test_two_gaussians_on_the_same_data_are_one_gaussian_of_sigma_eff():
  """The docstring's argument, without subsampling: dp_accounting's composition of Gaussian(σ)
  and Gaussian(σ_c) has the ε of one Gaussian(σ_eff) (PLD, up to its discretisation)."""
  sigma, sigma_c, delta = 1.5, 2.5, 1e-5
  both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma),
                                        dp_accounting.GaussianDpEvent(sigma_c)])
  one = dp_accounting.GaussianDpEvent(calibration.effective_noise_multiplier(sigma, sigma_c))
  assert (accounting.epsilon_of_event(both, delta) ==
          pytest.approx(accounting.epsilon_of_event(one, delta), rel=2e-3))


def _plan(count_noise, noise_multiplier=None, **blocks):
  """small_config's plan (10 private steps of 20, ε = 2, RDP) for 54,000 private examples."""
  c = small_config(dp=dict(clip_fraction_noise=count_noise, noise_multiplier=noise_multiplier),
                   **blocks)
  return plan_lib.plan_privacy(c, 54000, state_lib.alpha_schedule(c), 1.0)


def test_calibration_meets_the_target_with_the_count_released():
  """σ_eff is calibrated to the target; σ on the gradient is larger and σ, σ_c give σ_eff back."""
  plan, without = _plan(2.0), _plan(0.0)
  assert plan.planned_private_steps == 10
  eps = accounting.epsilon(plan.effective_noise_multiplier, plan.sampling_rate, 10, 1e-5, "rdp")
  assert 0.99 * 2.0 <= eps <= 2.0
  assert plan.effective_noise_multiplier == without.noise_multiplier  # the same calibration
  assert plan.noise_multiplier > plan.effective_noise_multiplier
  assert calibration.effective_noise_multiplier(plan.noise_multiplier, 2.0) == pytest.approx(
      plan.effective_noise_multiplier, rel=1e-12)
  given = _plan(2.0, noise_multiplier=1.0)
  assert given.noise_multiplier == 1.0
  assert given.effective_noise_multiplier == calibration.effective_noise_multiplier(1.0, 2.0)


def test_count_noise_at_or_below_sigma_eff_is_refused_at_the_start():
  sigma_eff = _plan(0.0).noise_multiplier
  for count_noise in (sigma_eff, 0.5 * sigma_eff):
    with pytest.raises(ValueError, match="Raise dp.clip_fraction_noise"):
      _plan(count_noise)
  # An automatic switch plans later; the earliest switch's σ_eff (10 private steps) is checked
  # now, before the public phase.
  auto = dict(mixing=dict(schedule="auto", auto=dict(min_switch_step=10)))
  with pytest.raises(ValueError, match="clip_fraction_noise"):
    _plan(0.5 * sigma_eff, **auto)
  assert _plan(4 * sigma_eff, **auto).noise_multiplier is None


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_clip_fraction_noise_is_refused(value):
  c = small_config(dp=dict(clip_fraction_noise=value))
  with pytest.raises(ValueError, match="clip_fraction_noise"):
    config_lib.validate(c)


def test_an_unset_count_leaves_the_trajectory_view_as_before():
  """clip_fraction_noise = 0 is not in the checkpoint's config view: checkpoints from before it
  resume; a released count is, so a run cannot resume with another σ_c."""
  assert "clip_fraction_noise" not in config_lib.trajectory_view(small_config())["dp"]
  set_view = config_lib.trajectory_view(small_config(dp=dict(clip_fraction_noise=3.0)))
  assert set_view["dp"]["clip_fraction_noise"] == 3.0


# ------------------------------------------------------------------------------------------------
# In the trainer (real data).


def _train_logs(workdir):
  return [r for r in metrics.read_metrics(workdir) if r["kind"] == "train"]


def test_trainer_logs_the_noisy_fraction_on_private_steps_and_accounts_sigma_eff(tmp_path,
                                                                                dataset_cache):
  """4 steps (2 public, 2 private), calibrated to ε = 2 with the count released: the private
  steps' records carry noisy_clip_fraction, the public ones do not; the ledger's ε is
  dp_accounting's for 2 × PoissonSampled(q, Gaussian(σ_eff)) and meets the target."""
  require_data()
  config = small_config(schedule=dict(total_steps=4), mixing=dict(switch_step=2),
                        dp=dict(clip_fraction_noise=2.0, insecure_reproducible_seed=1),
                        log_every_steps=1)
  r = loop.train_and_evaluate(config, str(tmp_path), show_progress=False)
  p = r["privacy"]
  assert r["stopped"] == "completed" and p["private_steps"] == 2
  logs = _train_logs(str(tmp_path))
  assert [("noisy_clip_fraction" in x) for x in logs] == [False, False, True, True]
  for x in logs:
    assert set(x) - {"step", "kind"} <= ALLOWED_RECORD_KEYS["train"]
  assert all(np.isfinite(x["noisy_clip_fraction"]) for x in logs[2:])
  rdp = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))
  rdp.compose(dp_accounting.PoissonSampledDpEvent(
      p["sampling_rate"], dp_accounting.GaussianDpEvent(p["effective_noise_multiplier"])), 2)
  assert p["epsilon"] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-12)
  assert 0.99 * 2.0 <= p["epsilon"] <= 2.0
  assert p["clip_fraction_noise"] == 2.0
  assert p["noise_multiplier"] > p["effective_noise_multiplier"]
  assert "noisy_clip_fraction" in p["released"]
  text = statement_lib.format_statement(p)
  assert "σ_c = 2" in text and "σ_eff" in text


def test_without_the_count_nothing_is_logged_and_the_spend_is_unchanged(tmp_path, dataset_cache):
  """clip_fraction_noise = 0 (the default): no noisy_clip_fraction anywhere, σ_eff = σ and the
  ε is what the calibration alone gives, as before the option existed."""
  require_data()
  config = small_config(schedule=dict(total_steps=4), mixing=dict(switch_step=2),
                        dp=dict(insecure_reproducible_seed=1), log_every_steps=1)
  r = loop.train_and_evaluate(config, str(tmp_path), show_progress=False)
  assert not any("noisy_clip_fraction" in x for x in _train_logs(str(tmp_path)))
  p = r["privacy"]
  q = p["sampling_rate"]
  sigma = calibration.calibrate_noise(2.0, 1e-5, q, 2, "rdp")
  assert p["noise_multiplier"] == p["effective_noise_multiplier"] == sigma
  assert p["epsilon"] == accounting.epsilon(sigma, q, 2, 1e-5, "rdp")
  assert p["clip_fraction_noise"] == 0.0 and "noisy_clip_fraction" not in p["released"]


def test_sparta_selection_steps_release_the_count_too(tmp_path, dataset_cache):
  """SPARTA's selection steps are private steps (`make_score`): they release the noisy count as
  well, and every private step is accounted at σ_eff."""
  require_data()
  config = small_config(schedule=dict(total_steps=4), mixing=dict(switch_step=0),
                        finetune=dict(sparse=dict(method="sparta", fraction=0.25, warmup_steps=1,
                                                  selection_steps=1)),
                        dp=dict(clip_fraction_noise=3.0, insecure_reproducible_seed=2),
                        log_every_steps=1)
  p = loop.train_and_evaluate(config, str(tmp_path), show_progress=False)["privacy"]
  logs = _train_logs(str(tmp_path))
  assert len(logs) == 4 and all(np.isfinite(x["noisy_clip_fraction"]) for x in logs)
  assert p["private_steps"] == 4
  assert p["epsilon"] == accounting.epsilon(p["effective_noise_multiplier"], p["sampling_rate"],
                                            4, 1e-5, "rdp")
