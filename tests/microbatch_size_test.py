"""Tests of the automatic microbatch size: the search, XLA's estimate, free memory, the trainer."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import config as config_lib
from dpjax import data, models, parallel
from dpjax.privacy import clipping
from dpjax.train import loop, metrics, microbatch_size as mb, state as state_lib
from dpjax.train import step as step_lib
from tests.e2e_test import small_config

CANDIDATES = [1, 2, 4, 8, 16, 32, 64]


def affine_bytes(calls):
  """A fake compiled_bytes: 1000 + 100·m bytes, recording each size it is asked about."""
  def compiled_bytes(m):
    calls.append(m)
    return 1000 + 100 * m
  return compiled_bytes


@pytest.mark.parametrize("free_bytes", [1100, 1300, 1799, 1800, 2000, 4199, 4200, 10_000, 10**9])
def test_chooses_the_largest_candidate_under_the_budget(free_bytes):
  calls = []
  chosen = mb.choose_microbatch_size(affine_bytes(calls), free_bytes, CANDIDATES, safety=1.0)
  assert chosen == max(m for m in CANDIDATES if 1000 + 100 * m <= free_bytes)  # the reference
  assert len(calls) == len(set(calls)) <= 1 + math.ceil(math.log2(len(CANDIDATES)))


def test_the_safety_fraction_shrinks_the_budget_and_order_does_not_matter():
  calls = []
  # 0.5 · 5000 = 2500 bytes allow m = 15 at most: 8 fits, 16 does not.
  assert mb.choose_microbatch_size(affine_bytes(calls), 5000, CANDIDATES[::-1], 0.5) == 8
  assert calls[0] == 64  # the largest is tried first: it often fits, in one compile


def test_nothing_fits_is_a_clear_error():
  with pytest.raises(mb.MicrobatchSizeError, match=r"smallest microbatch size, 4.*"
                     r"perf.memory_fraction.*perf.microbatch_size"):
    mb.choose_microbatch_size(affine_bytes([]), 1000, [4, 8, 16], 0.9)


@pytest.mark.parametrize("candidates,safety", [([], 0.9), ([0, 4], 0.9), ([4], 0.0), ([4], 1.5)])
def test_invalid_arguments(candidates, safety):
  with pytest.raises(ValueError):
    mb.choose_microbatch_size(affine_bytes([]), 10**9, candidates, safety)


def test_candidates_are_powers_of_two_times_the_devices_up_to_the_batch():
  assert mb.candidate_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]
  assert mb.candidate_sizes(100, multiple_of=8) == [8, 16, 32, 64]
  assert mb.candidate_sizes(3, multiple_of=8) == [8]  # one row per device at least
  assert mb.candidate_sizes(96, multiple_of=6) == [6, 12, 24, 48, 96]


def fake_compiled(analysis):
  return types.SimpleNamespace(memory_analysis=lambda: analysis)


def stats(temp, argument, output, alias):
  return types.SimpleNamespace(temp_size_in_bytes=temp, argument_size_in_bytes=argument,
                               output_size_in_bytes=output, alias_size_in_bytes=alias)


def test_estimate_is_temp_plus_arguments_plus_outputs_minus_aliases():
  assert mb.compiled_memory_bytes(fake_compiled(stats(100, 20, 10, 10))) == 120
  per_device = [stats(100, 20, 10, 10), stats(300, 20, 10, 10)]
  assert mb.compiled_memory_bytes(fake_compiled(per_device)) == 320


def test_no_estimate_is_a_clear_error():
  with pytest.raises(mb.MicrobatchSizeError, match="no memory estimate.*perf.microbatch_size"):
    mb.compiled_memory_bytes(fake_compiled(None))


def test_free_memory_of_accelerators_and_of_cpu_devices_sharing_the_host(monkeypatch):
  gpu = lambda limit, used: types.SimpleNamespace(
      memory_stats=lambda: dict(bytes_limit=limit, bytes_in_use=used))
  assert mb.free_memory_bytes([gpu(1000, 300), gpu(1000, 100)]) == 700  # the least free
  monkeypatch.setattr(mb, "host_available_bytes", lambda: 8000)
  cpus = jax.local_devices()[:2]  # CPU devices give no memory_stats
  assert all(d.memory_stats() is None for d in cpus)
  assert mb.free_memory_bytes(cpus) == 4000


def test_host_available_bytes_is_positive():
  assert mb.host_available_bytes() > 0


def test_every_process_uses_the_smallest_choice(monkeypatch):
  fake = affine_bytes([])
  assert mb.choose_on_every_process(fake, 10**9, CANDIDATES) == 64  # one process: its own
  monkeypatch.setattr(mb, "min_over_processes", lambda size: min(size, 8))  # another chose 8
  assert mb.choose_on_every_process(fake, 10**9, CANDIDATES) == 8
  monkeypatch.setattr(mb, "min_over_processes", lambda size: 0)  # nothing fits on another one
  with pytest.raises(mb.MicrobatchSizeError, match="another process"):
    mb.choose_on_every_process(fake, 10**9, CANDIDATES)


def test_xla_estimate_of_the_cnn_accumulate_step_grows_with_the_microbatch():
  """The estimate sees the [m, *params] per-example gradients that vmap materialises. (The step
  is built as the trainer builds it for small_config, so its compiled form is shared.)"""
  model = models.build_model("cnn_tanh_mnist", 10)
  mesh = parallel.make_mesh(1, 1)
  params = parallel.place(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"], mesh)
  layout = parallel.make_layout(mesh, params)
  rule = clipping.FlatClip(1.0)
  accumulate = step_lib.make_accumulate(step_lib.make_example_loss(model), rule, layout=layout)
  acc = jax.eval_shape(step_lib.make_zero_sum(rule, layout), params)
  one = (dict(image=np.zeros((1, 28, 28, 1), np.float32), label=np.zeros(1, np.int32)),
         np.ones(1, bool))
  measure = mb.measure_jitted(
      accumulate,
      lambda m: (acc, params, None, *mb.abstract_rows(one, m, layout.batch), np.bool_(True)))
  small, large = measure(8), measure(64)
  param_bytes = 4 * sum(p.size for p in jax.tree_util.tree_leaves(params))
  assert large - small >= (64 - 8) * param_bytes


def test_config_validation():
  config_lib.validate(small_config(perf=dict(microbatch_size=0)))
  with pytest.raises(ValueError, match="perf.microbatch_size must be > 0, or 0"):
    config_lib.validate(small_config(perf=dict(microbatch_size=-8)))
  for fraction in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"perf.memory_fraction.*\(0, 1\]"):
      config_lib.validate(small_config(perf=dict(memory_fraction=fraction)))


def synthetic_data(config):
  """Random Fashion-MNIST-shaped data (2000 training images, 10% public; 200 test images): the
  trainer's code path without converting the real files."""
  rng = np.random.default_rng(0)
  make = lambda n, split: data.Dataset(rng.integers(0, 256, (n, 28, 28, 1), np.uint8),
                                       rng.integers(0, 10, n).astype(np.int32), 10,
                                       "fashion_mnist", split)
  return state_lib.TrainingData(data.split_dataset(make(2000, "train"), 0.1, config.seed),
                                make(200, "test"), None)


def test_auto_size_trains_exactly_as_the_explicit_size_it_chose(tmp_path, monkeypatch):
  monkeypatch.setattr(state_lib, "load_training_data", synthetic_data)
  blocks = dict(schedule=dict(total_steps=3), mixing=dict(switch_step=1),
                dp=dict(expected_batch_size=64, insecure_reproducible_seed=0))
  auto = small_config(perf=dict(microbatch_size=0), **blocks)
  explicit = small_config(perf=dict(microbatch_size=64), **blocks)
  # A checkpoint of either resumes under the other: perf is not part of the trajectory.
  assert config_lib.trajectory_view(auto) == config_lib.trajectory_view(explicit)
  a = loop.train_and_evaluate(auto, str(tmp_path / "auto"), show_progress=False)
  b = loop.train_and_evaluate(explicit, str(tmp_path / "explicit"), show_progress=False)
  assert a["privacy"] == b["privacy"] and a["privacy"]["private_steps"] == 2
  # CPU hosts have memory to spare for the CNN: the largest candidate, the expected batch size.
  assert a["perf"]["microbatch_size"] == 64 and a["perf"]["microbatch_size_auto"]
  assert b["perf"] == dict(microbatch_size=64, microbatch_size_auto=False)
  perf_logs = [r for r in metrics.read_metrics(str(tmp_path / "auto")) if r["kind"] == "perf"]
  assert perf_logs[0]["microbatch_size"] == 64 and perf_logs[0]["step_bytes"] > 0
  pa, _ = loop.load_trained_state(auto, str(tmp_path / "auto"))
  pb, _ = loop.load_trained_state(explicit, str(tmp_path / "explicit"))
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_array_equal(x, y)  # the auto run is the explicit run of the size it chose


def test_the_trainer_says_when_poisson_padding_wastes_much_of_the_step():
  """From N, q and the microbatch size only: the CIFAR study's 512 rows at an expected batch of
  1,024 of 45,000 pad about a quarter of the batch; 64 rows pad under the hint's 10%."""
  from dpjax.train import engine
  plan = types.SimpleNamespace(num_private_examples=45_000, sampling_rate=1024 / 45_000)
  said = []
  engine._say_padding(plan, 512, False, said.append)
  assert len(said) == 1 and "about 25% of the expected batch" in said[0], said
  assert "perf.microbatch_size=256 would pad about 12%" in said[0]
  engine._say_padding(plan, 64, False, said.append)
  engine._say_padding(types.SimpleNamespace(num_private_examples=0, sampling_rate=1.0), 512,
                      False, said.append)
  assert len(said) == 1
  # dp.constant_time pads to the capacity: 3 × 512 = 1,536 rows (+50%); 6 × 256 = 1,536 too.
  engine._say_padding(plan, 512, True, said.append)
  assert "padded to one capacity (dp.constant_time) in microbatches of 512 rows, about 50%" \
      in said[1], said
  assert "perf.microbatch_size=256 would pad about 50%" in said[1]
