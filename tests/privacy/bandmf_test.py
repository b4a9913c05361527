"""privacy.bandmf: the correlated noise has covariance C^{-1} C^{-T} across
steps, b = 1 is DP-SGD bit for bit, the accounting reduces to DP-SGD's with
(q b, ceil(T / b)), calibration meets its target, keys are secret."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import privacy
from dpjax.privacy import bandmf


def _noises(tx, dim: int, steps: int):
  """float64 [steps, dim]: the noisy updates of zero sums, step by step."""
  params = {"w": jnp.zeros(dim)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for _ in range(steps):
    noisy, state = update(params, state)
    out.append(np.asarray(noisy["w"], np.float64))
  return np.stack(out)  # [steps, dim]


def test_coefficients_are_the_unit_norm_banded_square_root():
  c = bandmf.coefficients(4)
  np.testing.assert_allclose(c / c[0], [1, 1 / 2, 3 / 8, 5 / 16])
  assert np.linalg.norm(c) == pytest.approx(1.0)
  m = bandmf.strategy_matrix(4, 10)
  # Every column norm <= 1 (the sensitivity the accounting assumes).
  assert np.linalg.norm(m, axis=0).max() == pytest.approx(1.0)
  assert np.allclose(np.triu(m, 1), 0) and np.allclose(np.tril(m, -4), 0)
  # Unscaled, C C = the prefix-sum matrix for the first b rows: the square
  # root the closed form comes from.
  s = m / c[0]
  np.testing.assert_allclose((s @ s)[:4, :4], np.tril(np.ones((4, 4))),
                             atol=1e-12)


def test_covariance_across_steps_is_inverse_strategy():
  steps, bands, sigma, clip, batch = 6, 3, 2.0, 0.5, 4.0
  tx = bandmf.bandmf_noise(clip, sigma, batch, bands, seed=0)
  w = _noises(tx, 40_000, steps) * batch / (sigma * clip)  # w_t per coord.
  inv = np.linalg.inv(bandmf.strategy_matrix(bands, steps))
  np.testing.assert_allclose(np.cov(w), inv @ inv.T, atol=0.05)
  assert abs(w.mean()) < 0.02
  # C w is white noise (the z the mechanism releases as C x + z).
  z = bandmf.strategy_matrix(bands, steps) @ w
  np.testing.assert_allclose(np.cov(z), np.eye(steps), atol=0.05)


def test_one_band_is_dp_sgd_bit_for_bit():
  a = _noises(bandmf.bandmf_noise(1.0, 1.3, 8.0, 1, seed=5), 33, 4)
  b = _noises(privacy.add_noise(1.0, 1.3, 8.0, seed=5), 33, 4)
  np.testing.assert_array_equal(a, b)
  assert bandmf.epsilon(0.9, 0.01, 200, 1e-5, 1) == privacy.epsilon(
      0.9, 0.01, 200, 1e-5)


def test_accounting_is_dp_sgd_over_partitions():
  eps = bandmf.epsilon(1.0, 0.01, 100, 1e-5, bands=4)
  assert eps == privacy.epsilon(1.0, 0.04, 25, 1e-5)
  sigma = bandmf.calibrate_noise_multiplier(8.0, 0.01, 100, 1e-5, bands=4)
  assert bandmf.epsilon(sigma, 0.01, 100, 1e-5, 4) <= 8.0
  assert bandmf.epsilon(sigma * 0.98, 0.01, 100, 1e-5, 4) > 8.0
  with pytest.raises(ValueError, match="config.privacy.bands=200"):
    bandmf.epsilon(1.0, 0.01, 100, 1e-5, bands=200)


def test_cyclic_sampling_partitions_and_rates():
  """Step t samples only the indices of partition t mod b (each index's own
  secret partition, fixed across steps), each at rate q b; over b
  consecutive steps every example is eligible exactly once."""
  n, q, b, steps = 23, 0.1, 4, 4000
  part = privacy.sampling.partition_of(7, np.arange(n), b)
  counts = np.zeros(n)
  for t in range(steps):
    idx = privacy.sampling.sample_cyclic_indices(7, t, n, q, b)
    assert (part[idx] == t % b).all() and (np.diff(idx) > 0).all()
    counts[idx] += 1
  # Every example: steps / b eligible steps at rate q b = q per step overall.
  np.testing.assert_allclose(counts / steps, q, atol=0.02)
  # The partition is a secret per-index draw, not i mod b: uniform over b,
  # and another seed gives another partition.
  big = privacy.sampling.partition_of(7, np.arange(40_000), b)
  np.testing.assert_allclose(np.bincount(big, minlength=b) / 40_000,
                             1 / b, atol=0.01)
  assert abs(np.mean(big == np.arange(40_000) % b) - 1 / b) < 0.01
  other = privacy.sampling.partition_of(8, np.arange(40_000), b)
  assert abs(np.mean(big == other) - 1 / b) < 0.01
  np.testing.assert_array_equal(
      privacy.sampling.sample_cyclic_indices(7, 5, n, q, 1),
      privacy.sample_indices(7, 5, n, q))
  with pytest.raises(ValueError, match="cycle=4"):
    privacy.sampling.sample_cyclic_indices(7, 5, n, 0.3, 4)


def test_default_key_is_secret_and_state_checkpoints_as_a_pytree():
  tx = bandmf.bandmf_noise(1.0, 1.0, 1.0, 3)
  s1, s2 = tx.init({"w": jnp.zeros(2)}), tx.init({"w": jnp.zeros(2)})
  assert not np.array_equal(s1.rng_key, s2.rng_key)
  assert len(s1.past) == 2 and len(jax.tree.leaves(s1)) == 4
  assert math.isfinite(float(s1.count))


def test_white_box_audit_of_the_bandmf_step_is_sound_and_has_power():
  """Dirac canaries through the real clipped sum + BandMF noise (b=4),
  scored by the matched filter that undoes the correlation: the one-run
  bound stays below the claimed per-canary epsilon, and a step with half
  the noise is caught."""
  sigma, delta, m = 1.25, 1e-6, 200_000
  theory = privacy.epsilon(sigma, 1.0, 1, delta)
  bandmf4 = privacy.mechanisms.bandmf.BandMF(
      noise_multiplier=sigma, sampling_rate=1.0, steps=m // 1000,
      num_examples=m, delta=delta, accountant="pld", bands=4)
  run = lambda err: privacy.audit.audit_gaussian_step(
      1.0, sigma, m, delta=delta, seed=0, noise_scale_error=err,
      mechanism=bandmf4)
  correct = run(1.0)
  assert correct.theoretical_epsilon == pytest.approx(theory)
  assert 0.5 * theory < correct.empirical_epsilon <= theory
  assert run(0.5).empirical_epsilon > theory
