"""Tests for dpjax.privacy.optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.privacy import noise
from dpjax.privacy import optimizers


def test_dpsgd_is_noise_then_sgd():
  params = {"w": jnp.zeros((5000,))}
  clipped_sum = {"w": jnp.full((5000,), 4.0)}
  tx = optimizers.dpsgd(0.5, 1.0, 2.0, expected_batch_size=8.0, seed=3)
  upd, state = tx.update(clipped_sum, tx.init(params))
  noisy = noise.privatize(clipped_sum, jax.random.fold_in(
      jax.random.PRNGKey(3), 0), 1.0, 2.0, 8.0)
  np.testing.assert_allclose(upd["w"], -0.5 * noisy["w"], rtol=1e-6)
  assert np.mean(upd["w"]) == pytest.approx(-0.25, abs=0.01)
  upd2, _ = tx.update(clipped_sum, state)
  assert not np.allclose(upd["w"], upd2["w"])


def test_dpsgd_momentum_and_dpadamw_train():
  # Noise-free DP optimizers still minimise a quadratic: sanity of the chain.
  target = jnp.arange(4.0)
  loss = lambda p: jnp.sum((p - target) ** 2)
  for tx in (optimizers.dpsgd(0.05, 100.0, 0.0, 1.0, 0, momentum=0.9),
             optimizers.dpadamw(0.1, 100.0, 0.0, 1.0, 0, weight_decay=0.0)):
    p = jnp.zeros(4)
    state = tx.init(p)
    for _ in range(300):
      upd, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, upd)
    np.testing.assert_allclose(p, target, atol=0.05)
