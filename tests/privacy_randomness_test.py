"""Attacks on the mechanism's secrecy: the noise and the batches must not follow from anything
published, and nothing computed from the private batch may leave the device unnoised."""

import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import curvature
from dpjax.privacy import noise, randomness, sampling
from dpjax.train import checkpoint, loop, metrics, state as state_lib
from tests.conftest import require_data
from tests.e2e_test import small_config


@pytest.fixture(autouse=True)
def _data(dataset_cache):
  require_data()


def _one_private_sgd_step(**dp):
  """One DP step of plain SGD (lr 1) from the seed's initial params, σ = 50: a release from which
  the clipped sum is the update minus the noise."""
  return small_config(dp=dict(noise_multiplier=50.0, target_epsilon=None, **dp),
                      mixing=dict(switch_step=0), schedule=dict(total_steps=1),
                      optimizer=dict(name="sgd", learning_rate=1.0, momentum=0.0))


def _recovered_sum_norm(config, released, noise_seed):
  """The attack: rebuild the initial params from the public config, regenerate the noise from
  `noise_seed` and subtract it; returns ‖recovered clipped sum‖. A right guess gives a vector of
  norm ≤ |batch|·C; a wrong one is dominated by two noise draws, ~ √2·σ·C·√d."""
  parts = state_lib.load_data(config)[0]
  _, initial = state_lib.create_model(config, parts.private)
  b = config.dp.expected_batch_size
  tx = noise.add_gaussian_noise(config.dp.noise_multiplier, config.dp.clip_norm, b,
                                seed=noise_seed)
  noise_mean, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, initial), tx.init(initial))
  recovered = jax.tree_util.tree_map(lambda p1, p0, z: b * (-(p1 - p0) - z), released, initial,
                                     noise_mean)
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                           for x in jax.tree_util.tree_leaves(recovered))))


def test_the_noise_cannot_be_regenerated_from_the_published_config(tmp_path):
  config = _one_private_sgd_step()
  loop.train_and_evaluate(config, str(tmp_path / "secret"), show_progress=False)
  released, _ = loop.load_trained_state(config, str(tmp_path / "secret"))
  bound = 3 * config.dp.expected_batch_size * config.dp.clip_norm  # |batch| ≤ 3·E[|batch|] here
  # The published seed (the old noise key), and the reproducible mode's key for it: both fail.
  for guess in (config.seed, randomness.noise_key(randomness.fixed_secret(config.seed))):
    assert _recovered_sum_norm(config, released, guess) > 20 * bound
  # The same attack succeeds where the seed is known: the test can tell the difference.
  insecure = _one_private_sgd_step(insecure_reproducible_seed=config.seed)
  loop.train_and_evaluate(insecure, str(tmp_path / "insecure"), show_progress=False)
  released, _ = loop.load_trained_state(insecure, str(tmp_path / "insecure"))
  key = randomness.noise_key(randomness.fixed_secret(config.seed))
  assert _recovered_sum_norm(insecure, released, key) <= bound


def test_two_default_runs_release_different_noise_and_reproducible_runs_the_same(tmp_path):
  config = small_config(schedule=dict(total_steps=3), mixing=dict(switch_step=1))
  finals = []
  for name in ("a", "b"):
    loop.train_and_evaluate(config, str(tmp_path / name), show_progress=False)
    finals.append(loop.load_trained_state(config, str(tmp_path / name))[0])
  assert any(not np.array_equal(x, y) for x, y in zip(*map(jax.tree_util.tree_leaves, finals)))
  fixed = small_config(schedule=dict(total_steps=3), mixing=dict(switch_step=1),
                       dp=dict(insecure_reproducible_seed=3))
  finals = []
  for name in ("c", "d"):
    r = loop.train_and_evaluate(fixed, str(tmp_path / name), show_progress=False)
    finals.append(loop.load_trained_state(fixed, str(tmp_path / name))[0])
  for x, y in zip(*map(jax.tree_util.tree_leaves, finals)):
    np.testing.assert_array_equal(x, y)
  assert "INSECURE" in r["privacy"]["randomness"]


# What a run may write. Everything here is public (config, schedule, public or held-out data) or
# a noisy, accounted release (ε of the ledger): nothing is a statistic of a private batch.
ALLOWED_RECORD_KEYS = {
    "perf": {"microbatch_size", "microbatch_size_auto", "step_bytes", "free_bytes"},
    # loss: of the public batch (absent on private-only steps). noisy_clip_fraction: the private
    # batch's count of clipped examples + N(0, σ_c²) over B (dp.clip_fraction_noise > 0 only),
    # noised from the secret key and accounted (the step's σ_eff, accounting.py).
    "train": {"alpha", "loss", "noisy_clip_fraction"},
    "eval": {"test_accuracy", "test_loss", "epsilon"},  # the test split is held out
    "final": {"test_accuracy", "test_loss", "epsilon"},
    "curvature": set(curvature.CurvatureTerms._fields) | {
        "loss_improvement_public", "noise_multiplier", "decelerator", "loss_improvement_dp",
        "alpha_star", "heldout_loss", "public_train_loss", "dp_efficiency", "dp_efficiency_sgd",
        "dp_efficiency_adam", "lookahead_heldout_fall"},  # public batches only (PublicMonitor)
}
ALLOWED_RESULTS_KEYS = {"test_accuracy", "test_loss", "steps", "stopped", "train_seconds",
                        "privacy", "switch_step", "finetune", "perf",
                        "config",  # the run's config as given: public input
                        "provenance"}  # commit, date, devices, jax version
ALLOWED_PROGRESS_KEYS = {"loss", "acc", "eps", "alpha"}


def test_nothing_computed_from_private_batches_is_written(tmp_path, monkeypatch, capsys):
  """Every record, TensorBoard scalar (the same records), progress-bar field and results key of
  a mixed run is on the list above; the run's secret appears in no file but the checkpoint's
  arrays."""
  written, shown = [], []
  original_write, original_update = metrics.MetricsWriter.write, metrics.Progress.update
  monkeypatch.setattr(metrics.MetricsWriter, "write", lambda self, step, kind, values: (
      written.append((kind, set(values))), original_write(self, step, kind, values))[1])
  monkeypatch.setattr(metrics.Progress, "update", lambda self, n=1, **values: (
      shown.append(set(values)), original_update(self, n, **values))[1])
  secret = randomness.fixed_secret(12345)
  monkeypatch.setattr(randomness, "fresh_secret", lambda: secret.copy())
  config = small_config(schedule=dict(total_steps=6), mixing=dict(schedule="constant", alpha=0.5),
                        curvature=dict(every_steps=3, batch_size=32, num_probes=2),
                        eval=dict(every_steps=3), log_every_steps=1)
  results = loop.train_and_evaluate(config, str(tmp_path), show_progress=True)
  kinds = {kind for kind, _ in written}
  assert {"train", "eval", "final", "curvature"} <= kinds
  for kind, keys in written:
    assert keys <= ALLOWED_RECORD_KEYS[kind], (kind, keys - ALLOWED_RECORD_KEYS[kind])
  for keys in shown:
    assert keys <= ALLOWED_PROGRESS_KEYS
  assert set(results) <= ALLOWED_RESULTS_KEYS
  texts = [open(os.path.join(tmp_path, name)).read() for name in ("metrics.jsonl",
                                                                  "results.json")]
  texts.append(json.dumps(checkpoint.Checkpointer(str(tmp_path)).read_record()))
  texts.append(capsys.readouterr().out)
  needles = [str(int(w)) for w in secret] + [str(randomness.sampler_seed(secret))]
  needles += [f"{int(w):08x}" for w in secret]
  for text in texts:
    for needle in needles:
      assert needle not in text


def test_key_streams_are_separate():
  """The curvature probes' keys, the model's init key and the noise key never coincide (before,
  `fold_in(PRNGKey(seed), 0)` was both the step-0 probe key and the first noise step's key)."""
  seed = 0
  root = jax.random.PRNGKey(seed)
  probes = jax.random.fold_in(randomness.stream_key(seed, "curvature probes"), 0)
  np.testing.assert_array_equal(jax.random.fold_in(root, 0), jax.random.split(root)[0])  # why
  used = {tuple(np.asarray(k)) for k in (
      probes, root, *jax.random.split(root),
      randomness.stream_key(seed, "finetune random rows"),
      randomness.noise_key(randomness.fixed_secret(seed)))}
  assert len(used) == 6
  assert randomness.stream_id("a") != randomness.stream_id("b")


def test_default_samplers_and_noise_keys_are_fresh_and_unprinted():
  a = sampling.PoissonSampler(1000, 0.1, microbatch_size=8)
  b = sampling.PoissonSampler(1000, 0.1, microbatch_size=8)
  assert a.seed != b.seed and str(a.seed) not in repr(a)
  assert not np.array_equal(noise.init_noise_state().key, noise.init_noise_state().key)
  np.testing.assert_array_equal(noise.init_noise_state(5).key, jax.random.PRNGKey(5))


def test_fresh_secret_is_128_bits_of_os_entropy_and_fixed_secret_is_a_function_of_the_seed():
  draws = {randomness.fresh_secret().tobytes() for _ in range(16)}
  assert len(draws) == 16 and all(len(d) == 16 for d in draws)
  np.testing.assert_array_equal(randomness.fixed_secret(4), randomness.fixed_secret(4))
  assert not np.array_equal(randomness.fixed_secret(4), randomness.fixed_secret(5))


def test_a_bad_insecure_seed_is_refused(tmp_path):
  with pytest.raises(ValueError, match="insecure_reproducible_seed"):
    loop.train_and_evaluate(small_config(dp=dict(insecure_reproducible_seed=-1)), str(tmp_path),
                            show_progress=False)


_RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results"
_PUBLIC_STEP_KEYS = {"loss"}  # a public-only step's (α = 1) training loss: public data only


def test_committed_results_release_nothing_private_unnoised_and_name_their_randomness():
  """The committed runs (experiments/results) as an attacker reads them: a "train" record of a
  step that touched private data (α < 1) holds no statistic but noised ones (`noisy_*`); and a
  run that states its randomness drew it secretly (none committed in the INSECURE reproducible
  mode, whose noise follows from a published integer). The "loss" of a train record is allowed
  only at α = 1 in metrics.jsonl; TensorBoard's tags carry no α, so there only the key is checked."""
  metrics_files = sorted(_RESULTS.rglob("metrics.jsonl"))
  assert len(metrics_files) > 200  # the scan reaches the committed runs
  for path in metrics_files:
    for line in path.read_text().splitlines():
      record = json.loads(line)
      if record.get("kind") != "train":
        continue
      released = set(record) - {"step", "kind", "alpha"}
      if record.get("alpha") == 1.0:
        released -= _PUBLIC_STEP_KEYS
      assert all(key.startswith("noisy_") for key in released), (path, record)
  # TensorBoard mirrors those records as "kind/key" tags: the same keys, scanned in the raw
  # event files (no TensorBoard reader needed).
  event_files = sorted(_RESULTS.rglob("events.out.tfevents.*"))
  assert event_files
  for path in event_files:
    tags = {m.decode() for m in re.findall(rb"train/([A-Za-z_]+)", path.read_bytes())}
    assert all(t in {"alpha"} | _PUBLIC_STEP_KEYS or t.startswith("noisy_") for t in tags), (
        path, tags)
  stated = 0
  for path in _RESULTS.rglob("results.json"):
    privacy = json.loads(path.read_text()).get("privacy")
    randomness = privacy.get("randomness") if isinstance(privacy, dict) else None
    if randomness is not None:
      stated += 1
      assert randomness.startswith("secret:"), (path, randomness)
  assert stated >= 174  # bu2024_cifar's runs and the later bu2024 runs, on 2026-12-04
