"""Tests for dpjax.privacy.sampling: inclusion rates, padding, determinism, per-process slices."""

import dp_accounting
import numpy as np
import pytest

from dpjax.privacy import accounting, sampling


def test_poisson_inclusion_rate():
  """N = 500 examples over 4000 steps at q = 0.05. Total inclusions ~ Binomial(2e6, q): a 6-sd band
  fails with probability 2e-9. Each example's count ~ Binomial(4000, q), sd 13.8: a 6-sd band over
  500 examples fails with probability < 1e-6 (union bound)."""
  n, q, steps = 500, 0.05, 4000
  s = sampling.PoissonSampler(n, q, microbatch_size=8, seed=1)
  counts = np.zeros(n)
  for t in range(steps):
    counts[s.indices(t)] += 1
  total_sd = np.sqrt(n * steps * q * (1 - q))
  assert abs(counts.sum() - n * steps * q) < 6 * total_sd
  per_sd = np.sqrt(steps * q * (1 - q))
  assert np.all(np.abs(counts - steps * q) < 6 * per_sd)


def test_poisson_batch_sizes_vary_and_follow_the_binomial():
  s = sampling.PoissonSampler(1000, 0.1, microbatch_size=16, seed=0)
  sizes = np.array([len(s.indices(t)) for t in range(2000)])
  assert len(np.unique(sizes)) > 10
  # mean of 2000 Binomial(1000, 0.1): sd 9.49/sqrt(2000) = 0.21; a 6-sd band.
  assert abs(sizes.mean() - 100) < 6 * 0.2122


def test_padding_mask_is_exact_and_no_example_repeats():
  s = sampling.PoissonSampler(300, 0.2, microbatch_size=16, seed=3)
  for t in range(50):
    idx = s.indices(t)
    assert len(np.unique(idx)) == len(idx)
    b = s.batch(t)
    assert len(b.indices) % 16 == 0 and len(b.indices) - len(idx) < 16
    assert b.size == len(idx)
    np.testing.assert_array_equal(b.indices[b.mask], idx)
    assert not b.mask[len(idx):].any()
    assert sum(m.sum() for _, m in b.microbatches()) == len(idx)


def test_empty_batches():
  s = sampling.PoissonSampler(10, 0.01, microbatch_size=4, seed=0)
  empties = [t for t in range(200) if len(s.indices(t)) == 0]
  assert empties  # P(empty) = 0.99^10 = 0.90
  b = s.batch(empties[0])
  assert b.size == 0 and b.num_microbatches == 0 and list(b.microbatches()) == []
  assert b.for_process(1, 2).size == 0


def test_deterministic_from_seed_and_step():
  a = sampling.PoissonSampler(1000, 0.05, microbatch_size=8, seed=9)
  b = sampling.PoissonSampler(1000, 0.05, microbatch_size=8, seed=9)
  np.testing.assert_array_equal(a.indices(17), b.indices(17))
  assert not np.array_equal(a.indices(17), a.indices(18))
  c = sampling.PoissonSampler(1000, 0.05, microbatch_size=8, seed=10)
  assert not np.array_equal(a.indices(17), c.indices(17))


def test_each_process_gets_its_share_of_the_global_batch():
  s = sampling.PoissonSampler(1000, 0.1, microbatch_size=8, seed=2)
  b = s.batch(4)
  shares = [b.for_process(p, 3) for p in range(3)]
  assert len({len(x.indices) for x in shares}) == 1
  real = np.concatenate([x.indices[x.mask] for x in shares])
  np.testing.assert_array_equal(np.sort(real), s.indices(4))
  with pytest.raises(ValueError):
    b.for_process(3, 3)


def test_poisson_event_matches_the_accountant():
  s = sampling.PoissonSampler(1000, 0.02, microbatch_size=8)
  assert s.dp_event(1.1, 50) == accounting.poisson_gaussian_event(1.1, 0.02, 50)


def test_shuffle_requires_acknowledging_no_amplification():
  with pytest.raises(sampling.NoAmplificationError, match="no privacy amplification"):
    sampling.ShuffleSampler(100, 10, microbatch_size=5)


def test_shuffle_epochs_cover_every_example_once_and_account_without_amplification():
  s = sampling.ShuffleSampler(100, 10, microbatch_size=5, seed=0, no_amplification=True)
  epoch = np.concatenate([s.indices(t) for t in range(10)])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
  assert not np.array_equal(s.indices(0), s.indices(10))
  assert s.dp_event(2.0, 25) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(1.0), 3)
  poisson_eps = accounting.epsilon(2.0, 0.1, 25, 1e-5, "rdp")
  shuffle_eps = accounting.epsilon_of_event(s.dp_event(2.0, 25), 1e-5, "rdp")
  assert shuffle_eps > poisson_eps  # no amplification: a weaker guarantee


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5])
def test_bad_rate(q):
  with pytest.raises(ValueError, match=r"sampling rate q \(sampling_rate\) must be in \(0, 1\]"):
    sampling.PoissonSampler(100, q, microbatch_size=4)


def test_bad_sizes():
  with pytest.raises(ValueError, match="microbatch_size"):
    sampling.PoissonSampler(100, 0.1, microbatch_size=0)
  with pytest.raises(ValueError, match="exceeds"):
    sampling.ShuffleSampler(10, 20, microbatch_size=5, no_amplification=True)


def test_a_constant_work_sampler_pads_every_batch_to_its_capacity_and_never_cuts_one():
  """dp.constant_time: every batch has the same microbatches whatever its (private) size; one
  beyond the capacity keeps every example (the overflow `timing_delta` accounts)."""
  n, q, m = 2000, 0.05, 16  # expected batch 100, std ~9.7
  k = sampling.capacity_microbatches(n, q, m)
  assert sampling.overflow_probability(n, q, k * m) <= sampling.CAPACITY_TAIL
  assert sampling.overflow_probability(n, q, (k - 1) * m) > sampling.CAPACITY_TAIL
  sampler = sampling.PoissonSampler(n, q, m, seed=3, min_microbatches=k)
  sizes = set()
  for step in range(200):
    batch = sampler.batch(step)
    assert batch.num_microbatches == k
    np.testing.assert_array_equal(batch.indices[batch.mask], sampler.indices(step))
    sizes.add(batch.size)
  assert len(sizes) > 10 and sampler.constant_work
  tiny = sampling.PoissonSampler(n, q, m, seed=3, min_microbatches=1)  # a capacity of 16 rows
  assert tiny.batch(0).num_microbatches > 1 and tiny.batch(0).size == len(tiny.indices(0))
  assert not sampling.PoissonSampler(n, q, m, seed=3).constant_work
  with pytest.raises(ValueError, match="min_microbatches"):
    sampling.PoissonSampler(n, q, m, seed=3, min_microbatches=-1)


def test_timing_delta_is_the_overflow_chance_at_n_plus_one_times_one_plus_e_to_the_epsilon():
  n, q, m = 45000, 1024 / 45000, 512
  k = sampling.capacity_microbatches(n, q, m)
  assert k == 3  # 1,536 rows; 1,280 would overflow with probability ~3e-15 > 2^-64
  sampler = sampling.PoissonSampler(n, q, m, seed=0, min_microbatches=k)
  eta = 400 * sampling.overflow_probability(n + 1, q, 1536)
  assert sampling.timing_delta(sampler, 400, 8.0) == pytest.approx((1 + np.exp(8.0)) * eta)
  assert 0 < sampling.timing_delta(sampler, 400, 8.0) < 1e-30
  small = sampling.PoissonSampler(n, q, m, seed=0, min_microbatches=2)  # 1,024: half overflow
  assert sampling.timing_delta(small, 1, 1.0) > 0.5
  assert sampling.timing_delta(sampler, 0, 8.0) == 0.0
  assert sampling.timing_delta(sampling.PoissonSampler(n, q, m, seed=0), 400, 8.0) is None
