"""privacy.blt: the streaming noise is C^{-1} z, its covariance across steps
sigma^2 C_clip^2 Delta^2 C^{-1} C^{-T}; the sensitivity is the brute-force
maximum over participation sets; the optimised strategy beats DP-SGD's
identity and the Toeplitz square root, near the single-participation lower
bound; the accounting is one Gaussian mechanism; keys are secret."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import privacy
from dpjax.privacy import bandmf
from dpjax.privacy import blt
from tests.privacy.bandmf_test import _noises

STRATEGY = blt.Strategy((0.9, 0.5), (0.3, 0.2))


def test_coefficients_inverse_and_matrix_agree():
  n = 12
  c = blt.coefficients(*STRATEGY, n)
  np.testing.assert_allclose(c[:3], [1.0, 0.5, 0.3 * 0.9 + 0.2 * 0.5])
  assert (c > 0).all() and (np.diff(c[1:]) < 0).all()
  m = blt.strategy_matrix(*STRATEGY, n)
  np.testing.assert_allclose(m[:, 0], c)
  inv = np.linalg.inv(m)
  np.testing.assert_allclose(inv[:, 0], blt.inverse_coefficients(*STRATEGY, n),
                             atol=1e-12)
  # C^{-1} is Toeplitz too.
  np.testing.assert_allclose(inv[5:, 5], inv[:-5, 0], atol=1e-12)


def test_streaming_noise_is_inverse_strategy_times_the_add_noise_draws():
  steps, sigma, clip, batch = 7, 2.0, 0.5, 4.0
  tx = blt.blt_noise(clip, sigma, batch, STRATEGY, steps, seed=3)
  w = _noises(tx, 16, steps)
  z = _noises(privacy.add_noise(clip, sigma, batch, seed=3), 16, steps)
  delta = blt.sensitivity(*STRATEGY, steps)
  inv = np.linalg.inv(blt.strategy_matrix(*STRATEGY, steps))
  np.testing.assert_allclose(w, delta * inv @ z, rtol=1e-5, atol=1e-5)


def test_covariance_across_steps():
  steps, sigma, clip, batch, b = 6, 2.0, 0.5, 4.0, 2
  strategy = blt.optimize(steps, b, 2)
  tx = blt.blt_noise(clip, sigma, batch, strategy, steps, b, seed=0)
  noise = _noises(tx, 40_000, steps) * batch  # sigma C_clip Delta w_t.
  delta = blt.sensitivity(*strategy, steps, b)
  inv = np.linalg.inv(blt.strategy_matrix(*strategy, steps))
  want = (sigma * clip * delta) ** 2 * inv @ inv.T
  np.testing.assert_allclose(np.cov(noise), want,
                             atol=0.05 * np.abs(want).max())
  assert abs(noise.mean()) < 0.02 * sigma * clip * delta


def _brute_force_sensitivity(strategy, steps: int, b: int) -> float:
  """The largest ||C 1_S|| over every participation set S with gaps >= b."""
  m = blt.strategy_matrix(*strategy, steps)
  best = 0.0
  for mask in itertools.product((0, 1), repeat=steps):
    idx = np.flatnonzero(mask)
    if len(idx) and (np.diff(idx) >= b).all():
      best = max(best, np.linalg.norm(m[:, idx].sum(1)))
  return best


@pytest.mark.parametrize("steps,b", [(9, 1), (10, 3), (11, 4), (8, 8)])
def test_sensitivity_is_the_worst_participation_set(steps, b):
  for strategy in (STRATEGY, blt.optimize(steps, b, 3)):
    best = _brute_force_sensitivity(strategy, steps, b)
    assert blt.sensitivity(*strategy, steps, b) == pytest.approx(best)
    prefix = blt.prefix_sensitivity(*strategy, steps, b)
    assert prefix[0] == 0 and (np.diff(prefix) > 0).all()
    assert prefix[-1] == pytest.approx(best)


def test_closed_form_holds_over_the_allowed_range():
  """Random strategies in the proven range (theta in (0, 1), omega > 0,
  sum omega above 1 too): the closed form is the brute-force maximum."""
  rng = np.random.default_rng(0)
  for _ in range(40):
    d, steps, b = rng.integers(1, 4), int(rng.integers(6, 10)), int(
        rng.integers(1, 4))
    strategy = blt.Strategy(tuple(rng.uniform(0.01, 0.99, d)),
                            tuple(np.exp(rng.uniform(-4, 2, d))))
    assert blt.sensitivity(*strategy, steps, b) == pytest.approx(
        _brute_force_sensitivity(strategy, steps, b))


@pytest.mark.parametrize("theta,omega,b,field", [
    ((0.5,), (-0.9,), 1, r"omega\[0\]=-0.9 .*\(0, inf\)"),
    ((0.9, 0.5), (0.3, -0.2), 2, r"omega\[1\]=-0.2 .*\(0, inf\)"),
    ((-0.9,), (0.5,), 2, r"theta\[0\]=-0.9 .*\(0, 1\)"),
    ((1.2,), (0.3,), 2, r"theta\[0\]=1.2 .*\(0, 1\)"),
    ((0.5,), (float("nan"),), 1, r"omega\[0\]=nan"),
    ((0.5, 0.2), (0.3,), 1, "as many omega as theta"),
])
def test_strategy_outside_the_proven_range_is_refused(theta, omega, b,
                                                       field):
  """Every entry point that would use the closed-form sensitivity refuses a
  strategy outside theta in (0, 1), omega > 0, naming the parameter, its
  value and the allowed range."""
  steps, strategy = 8, blt.Strategy(theta, omega)
  with pytest.raises(ValueError, match=field):
    blt.sensitivity(theta, omega, steps, b)
  with pytest.raises(ValueError, match=field):
    blt.blt_noise(1.0, 1.0, 1.0, strategy, steps, b, seed=0)
  with pytest.raises(ValueError, match=field):
    blt.ledger_rho(strategy, steps, b, 1.0, 0, 1)


@pytest.mark.parametrize("theta,omega,b", [((0.5,), (-0.9,), 1),
                                           ((-0.9,), (0.5,), 2)])
def test_why_refused_the_closed_form_underestimates_outside_the_range(
    theta, omega, b):
  """The closed form (the every-b-th-step pattern) is 27% / 18% below the
  brute-force maximum for these strategies: accepting them would add too
  little noise."""
  steps = 8
  closed = np.linalg.norm(
      blt.strategy_matrix(theta, omega, steps)[:, ::b].sum(1))
  assert closed < 0.85 * _brute_force_sensitivity(
      blt.Strategy(theta, omega), steps, b)


def _identity_loss(n, b):  # DP-SGD, no amplification: C = I.
  return math.ceil(n / b) * n * (n + 1) / 2


@pytest.mark.parametrize("n,b", [(64, 64), (256, 256), (200, 20)])
def test_optimised_strategy_beats_identity_and_toeplitz_square_root(n, b):
  s = blt.optimize(n, b, 4)
  assert all(0 < t < 1 for t in s.theta) and all(w > 0 for w in s.omega)
  got = blt.loss(*s, n, b)
  assert got < 0.35 * _identity_loss(n, b)
  # The (unbanded) Toeplitz square root of A, same sensitivity rule.
  c = bandmf.coefficients(n)
  sq = bandmf.strategy_matrix(n, n) / c[0]
  ones = (np.arange(n) % b) == 0
  sq_loss = (np.linalg.norm(sq @ ones) ** 2 *
             np.sum(np.cumsum(np.linalg.inv(sq), axis=0) ** 2))
  assert got < sq_loss
  if b == n:  # Single participation: ||A||_*^2 / n bounds every C.
    nuclear = np.linalg.svd(np.tril(np.ones((n, n))), compute_uv=False).sum()
    assert got < 1.15 * nuclear ** 2 / n
  # The O(n) loss is the dense one.
  inv = np.linalg.inv(blt.strategy_matrix(*s, n))
  dense = blt.sensitivity(*s, n, b) ** 2 * np.sum(np.cumsum(inv, 0) ** 2)
  assert got == pytest.approx(dense, rel=1e-8)


def test_every_step_participation_is_no_better_than_identity():
  n = 100
  assert blt.loss(*blt.optimize(n, 1, 4), n, 1) == pytest.approx(
      _identity_loss(n, 1), rel=1e-3)


def test_optimize_is_deterministic_float32_and_fast():
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  a = blt.optimize.__wrapped__(10_000, 100, 4)
  assert time.time() - t0 < 10
  assert a == blt.optimize.__wrapped__(10_000, 100, 4)
  assert all(float(np.float32(v)) == v for v in a.theta + a.omega)
  assert blt.loss(*a, 10_000, 100) < 0.05 * _identity_loss(10_000, 100)


def test_accounting_is_one_gaussian_mechanism():
  eps = blt.epsilon(2.0, 1e-5)
  assert eps == privacy.event_epsilon(
      __import__("dp_accounting").GaussianDpEvent(2.0), 1e-5)
  assert blt.epsilon(0.0, 1e-5) == math.inf
  sigma = blt.calibrate_noise_multiplier(4.0, 1e-5)
  assert blt.epsilon(sigma, 1e-5) <= 4.0 < blt.epsilon(sigma * 0.99, 1e-5)
  rdp = blt.calibrate_noise_multiplier(4.0, 1e-5, accountant="rdp")
  assert rdp > sigma  # RDP is looser.
  # Ledger increments: rho of the whole phase is 1/sigma^2.
  n, b = 20, 3
  total = sum(blt.ledger_rho(STRATEGY, n, b, sigma, t, 1) for t in range(n))
  assert total == pytest.approx(sigma ** -2, rel=1e-12)
  assert blt.ledger_rho(STRATEGY, n, b, sigma, 0, n) == pytest.approx(
      sigma ** -2, rel=1e-12)


def test_bad_arguments_name_the_field():
  with pytest.raises(ValueError, match="config.privacy.blt_buffers=0"):
    blt.optimize(10, 1, 0)
  with pytest.raises(ValueError, match="config.privacy.min_separation=11"):
    blt.optimize(10, 11, 2)


def test_default_key_is_secret_and_state_checkpoints_as_a_pytree():
  tx = blt.blt_noise(1.0, 1.0, 1.0, STRATEGY, 10)
  s1, s2 = tx.init({"w": jnp.zeros(2)}), tx.init({"w": jnp.zeros(2)})
  assert not np.array_equal(s1.rng_key, s2.rng_key)
  assert len(s1.buffers) == 2 and len(jax.tree.leaves(s1)) == 4
  assert all(b.dtype == jnp.float32 for b in jax.tree.leaves(s1.buffers))
  assert privacy.blt_noise is blt.blt_noise


def test_white_box_audit_of_the_blt_step_is_sound_and_has_power():
  """Dirac canaries in every step of their residue class (the worst
  participation pattern) through the real clipped sum + BLT noise, scored
  by the matched filter that undoes the correlation: the one-run bound
  stays below the claimed per-canary epsilon, while a step with half the
  noise, or without the Delta_n scale (sigma C z per step, as if each
  participation were alone), is caught."""
  sigma, delta, m, b, n = 1.25, 1e-6, 16000, 4, 16
  theory = privacy.epsilon(sigma, 1.0, 1, delta)
  mechanism = privacy.mechanisms.blt.Blt(
      noise_multiplier=sigma, sampling_rate=1.0, steps=n, num_examples=m,
      delta=delta, accountant="pld", min_separation=b, blt_buffers=4)
  run = lambda err: privacy.audit.audit_gaussian_step(
      1.0, sigma, m, delta=delta, seed=0, noise_scale_error=err,
      mechanism=mechanism)
  real = run(1.0)
  assert real.theoretical_epsilon == pytest.approx(theory)
  assert 0.5 * theory < real.empirical_epsilon <= theory  # 2.34 vs 3.80.
  assert run(0.5).empirical_epsilon > theory  # 4.28.
  delta_n = blt.sensitivity(*blt.optimize(n, b, 4), n, b)  # 2.63
  assert run(1 / delta_n).empirical_epsilon > theory
