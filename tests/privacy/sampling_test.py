"""Tests for dpjax.privacy.sampling."""

import time

import numpy as np
import pytest
from scipy import stats

from dpjax.privacy import sampling


def test_inclusion_frequency_matches_q():
  n, q, steps = 200, 0.1, 2000
  counts = np.zeros(n)
  for step in range(steps):
    counts[sampling.sample_indices(7, step, n, q)] += 1
  # Each count ~ Binomial(steps, q): all 200 within 5 sigma, and chi-square
  # uniformity across indices.
  sd = np.sqrt(steps * q * (1 - q))
  assert np.all(np.abs(counts - steps * q) < 5 * sd)
  chi2 = np.sum((counts - steps * q) ** 2 / (steps * q * (1 - q)))
  assert stats.chi2.sf(chi2, df=n) > 1e-4
  # Pairwise independence proxy: inclusion of 0 and 1 together ~ q^2.
  both = sum(
      {0, 1} <= set(sampling.sample_indices(7, s, n, q).tolist())
      for s in range(steps))
  assert abs(both / steps - q * q) < 5 * np.sqrt(q * q / steps)


def test_sizes_are_binomial():
  n, q = 5000, 0.02
  sizes = np.array([sampling.sample_indices(3, s, n, q).size
                    for s in range(2000)])
  mean, var = n * q, n * q * (1 - q)
  assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / sizes.size)
  assert abs(sizes.var() / var - 1) < 0.15


def test_indices_sorted_distinct_in_range():
  for step in range(20):
    idx = sampling.sample_indices(0, step, 100, 0.6)  # dense branch
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)
    assert idx.min(initial=0) >= 0 and idx.max(initial=0) < 100


def test_deterministic_per_seed_and_step():
  a = sampling.sample_indices(1, 5, 10**6, 1e-3)
  b = sampling.sample_indices(1, 5, 10**6, 1e-3)
  np.testing.assert_array_equal(a, b)
  c = sampling.sample_indices(1, 6, 10**6, 1e-3)
  d = sampling.sample_indices(2, 5, 10**6, 1e-3)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, d)


def test_two_billion_examples_is_fast():
  n, q = 2_000_000_000, 100 / 2_000_000_000
  start = time.perf_counter()
  sizes = []
  for step in range(50):
    idx = sampling.sample_indices(0, step, n, q)
    assert np.all(np.diff(idx) > 0) and idx[-1] < n
    sizes.append(idx.size)
  assert time.perf_counter() - start < 2.0
  assert 60 < np.mean(sizes) < 140
  # Spread over the whole range, not just a prefix.
  assert idx.max() > n // 2


def test_cyclic_sampling_of_two_billion_examples_is_fast():
  """O(b * batch), never O(N): the partition is hashed for the candidates
  only; batches average q N and hold only the step's partition."""
  n, q, b = 2_000_000_000, 100 / 2_000_000_000, 8
  start = time.perf_counter()
  sizes = []
  for step in range(50):
    idx = sampling.sample_cyclic_indices(0, step, n, q, b)
    assert (sampling.partition_of(0, idx, b) == step % b).all()
    sizes.append(idx.size)
  assert time.perf_counter() - start < 2.0
  assert 60 < np.mean(sizes) < 140


def test_poisson_sample_pads_with_mask():
  b = sampling.poisson_sample(0, 0, 1000, 0.01, 64)
  assert b.indices.shape == (64,) and b.indices.dtype == np.int64
  assert b.mask.shape == (64,) and b.mask.dtype == np.float32
  assert not b.truncated
  assert b.mask.sum() == b.size
  np.testing.assert_array_equal(b.indices[:b.size],
                                sampling.sample_indices(0, 0, 1000, 0.01))
  assert np.all(b.indices[b.size:] == 0) and np.all(b.mask[b.size:] == 0)


def test_poisson_sample_truncates_uniformly():
  b = sampling.poisson_sample(0, 0, 1000, 0.5, 100)
  assert b.truncated and b.size == 100 and b.mask.sum() == 100
  full = sampling.sample_indices(0, 0, 1000, 0.5)
  assert set(b.indices.tolist()) <= set(full.tolist())
  assert np.all(np.diff(b.indices) > 0)
  # Kept subset is uniform over the draw: kept fraction of low vs high half.
  low = np.mean([np.mean(sampling.poisson_sample(0, s, 1000, 0.5, 100)
                         .indices < 500) for s in range(200)])
  assert abs(low - 0.5) < 0.03


def test_max_batch_size_for():
  n, q = 60000, 256 / 60000
  b = sampling.max_batch_size_for(n, q, 1e-9)
  assert stats.binom.sf(b, n, q) <= 1e-9 < stats.binom.sf(b - 1, n, q)
  assert sampling.max_batch_size_for(10, 0.5) == 10


def test_shard_for_process():
  b = sampling.poisson_sample(0, 0, 1000, 0.01, 16)
  parts = [sampling.shard_for_process(b.indices, b.mask, p, 4)
           for p in range(4)]
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]),
                                b.indices)
  np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]),
                                b.mask)
  with pytest.raises(ValueError, match="divisible"):
    sampling.shard_for_process(b.indices, b.mask, 0, 3)


def test_rejects_bad_args():
  with pytest.raises(ValueError):
    sampling.sample_indices(0, 0, 10, 1.5)
  with pytest.raises(ValueError):
    sampling.sample_indices(-1, 0, 10, 0.5)
