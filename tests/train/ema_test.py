"""train.ema: the EMA transform's arithmetic, its place in a phase's
optimizer, and its validation."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.train import ema as ema_lib
from dpjax.train import step as step_lib


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("warmup", [False, True])
def test_average_of_the_new_params(warmup):
  grads = [{"w": jnp.full(3, float(i + 1))} for i in range(4)]
  sgd = optax.sgd(0.5)
  params, state = _run(optax.named_chain(
      ("optimizer", sgd), ("ema", ema_lib.params_ema(0.9, warmup))),
                       {"w": jnp.zeros(3)}, grads)
  # Reference: the same SGD, averaged by hand with each update's decay.
  p, want = np.zeros(3), np.zeros(3)
  for t, g in enumerate(grads):
    p = p - 0.5 * np.asarray(g["w"])
    d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
    want = d * want + (1 - d) * p
  np.testing.assert_allclose(params["w"], p, rtol=1e-6)  # Updates unchanged.
  np.testing.assert_allclose(ema_lib.ema_of(state)["w"], want, rtol=1e-6)
  assert int(state["ema"].count) == len(grads)


def test_phase_optimizer_chains_it_last_only_when_asked():
  params = {"w": jnp.ones(2)}
  plain = step_lib.phase_optimizer(optax.sgd(0.1))
  assert ema_lib.ema_of(plain.init(params)) is None
  with_ema = step_lib.phase_optimizer(optax.sgd(0.1), ema_decay=0.99)
  state = with_ema.init(params)
  assert isinstance(state["ema"], ema_lib.EmaState)
  np.testing.assert_array_equal(ema_lib.ema_of(state)["w"], params["w"])


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_invalid_decay_names_the_field(decay):
  with pytest.raises(ValueError, match=f"config.train.ema_decay={decay}"):
    ema_lib.params_ema(decay)
