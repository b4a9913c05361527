"""User-level clipped delta sums: sensitivity, padding, local variables."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.privacy import clipping
from dpjax.privacy import user_level

E, D, L = 8, 5, 3  # examples per unit, input dim, local classes.


def _loss(shared, local, example):
  z = jnp.tanh(example["x"] @ shared["w"])
  logits = z @ local["h"]
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         example["y"])


def _init_local(rng):
  return {"h": jax.random.normal(rng, (D, L))}


def _fn(clip, lr=5.0, epochs=2, users_per_unit=1):
  train = user_level.local_training(
      _loss, _init_local, shared_optimizer=optax.sgd(lr),
      local_optimizer=optax.sgd(lr), batch_size=4, epochs=epochs)
  return user_level.clipped_delta_sum(train, clip,
                                      users_per_unit=users_per_unit)


def _units(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"example": {"x": rng.normal(size=(n, E, D)).astype(np.float32),
                      "y": rng.integers(0, L, (n, E)).astype(np.int32)},
          "mask": np.ones((n, E), np.float32),
          "rng": np.stack([np.array(jax.random.PRNGKey(i)) for i in range(n)])}


SHARED = {"w": jnp.asarray(np.random.default_rng(9).normal(size=(D, D)),
                           jnp.float32)}


def _dist(a, b):
  return float(clipping.global_norm(jax.tree.map(lambda x, y: x - y, a, b)))


def test_unit_clip_norm_halves_for_mixed_units():
  assert user_level.unit_clip_norm(1.0, 1) == 1.0
  assert user_level.unit_clip_norm(1.0, 8) == 0.5
  with pytest.raises(ValueError):
    user_level.unit_clip_norm(1.0, 0)


@pytest.mark.parametrize("k", [1, 4])
def test_one_users_data_moves_sum_at_most_c(k):
  """Units of k users (E/k examples each); user 0 of unit 1 is changed.

  Removing the user (add/remove adjacency, what the Poisson accounting
  assumes) moves the sum by <= C for every k. Rewriting ALL of the user's
  examples moves it by <= C for k > 1 (client clip C/2) and by <= 2C for
  k = 1 (replace-one = remove + add).
  """
  c = 1.0
  bounded = _fn(c, users_per_unit=k)
  assert (bounded.l2_sensitivity, bounded.unit) == (c, "user")
  fn = jax.jit(bounded)
  units = _units(3)
  mask = jnp.ones(3)
  base, _ = fn(SHARED, units, mask)
  rows = slice(0, E // k)  # the examples of one user of unit 1.
  removed = jax.tree.map(np.copy, units)
  removed["example"]["x"][1, rows] = np.nan  # never used: masked out.
  removed["mask"][1, rows] = 0.0
  unit_mask = mask.at[1].set(0.0) if k == 1 else mask  # k=1: unit is gone.
  out, _ = fn(SHARED, removed, unit_mask)
  assert 0.05 < _dist(base, out) <= c * (1 + 1e-5)
  worst = 0.0
  for seed in range(3):
    changed = jax.tree.map(np.copy, units)
    r = np.random.default_rng(100 + seed)
    changed["example"]["x"][1, rows] = 30 * r.normal(size=(E // k, D))
    changed["example"]["y"][1, rows] = r.integers(0, L, E // k)
    out, _ = fn(SHARED, changed, mask)
    worst = max(worst, _dist(base, out))
  assert 0.05 < worst <= (2 * c if k == 1 else c) * (1 + 1e-5)


def test_unclipped_mixed_units_can_exceed_c():
  """Why k > 1 needs C/2: with clip C a changed user moves the sum by > C."""
  fn = jax.jit(_fn(1.0))
  units = _units(1)
  base, _ = fn(SHARED, units, jnp.ones(1))
  changed = jax.tree.map(np.copy, units)
  changed["example"]["x"] *= -1.0
  out, _ = fn(SHARED, changed, jnp.ones(1))
  assert _dist(base, out) > 1.0 + 1e-3


def test_padding_units_contribute_nothing_whatever_their_data():
  fn = jax.jit(_fn(1.0))
  units = _units(3)
  mask = jnp.array([1.0, 0.0, 1.0])
  base, aux = fn(SHARED, units, mask)
  garbage = jax.tree.map(np.copy, units)
  garbage["example"]["x"][1] = np.nan
  garbage["example"]["x"][0] += 0.0
  out, aux2 = fn(SHARED, garbage, mask)
  assert _dist(base, out) == 0.0
  assert float(aux["count"]) == float(aux2["count"]) == 2.0
  only, _ = fn(SHARED, jax.tree.map(lambda x: x[::2], units), jnp.ones(2))
  assert _dist(base, only) < 1e-5


def _masked_mean_init(rng, shared, example, mask):
  """A data-dependent local init that multiplies by the mask (NaN * 0 is
  NaN: it would see a non-finite padding row if it were not zeroed)."""
  del rng
  mean_x = jnp.sum(example["x"] * mask[:, None], 0) / jnp.sum(mask)
  return {"h": jnp.outer(jnp.tanh(mean_x @ shared["w"]), jnp.ones(L))}


@pytest.mark.parametrize("from_data", [False, True])
def test_a_non_finite_padding_row_changes_nothing(from_data):
  """Padding rows are zeroed before any product: a unit whose padding row
  holds NaN, inf or anything else gets exactly the delta it gets with a
  zero padding row, and is not dropped as non-finite."""
  train = user_level.local_training(
      _loss, _masked_mean_init if from_data else _init_local,
      shared_optimizer=optax.sgd(0.5), local_optimizer=optax.sgd(0.5),
      batch_size=4, epochs=2, init_from_data=from_data)
  fn = jax.jit(user_level.clipped_delta_sum(train, 10.0))
  units = _units(1)
  units["mask"][0, [2, 5]] = 0.0  # Two padding rows, inside batches.
  units["example"]["x"][0, [2, 5]] = 0.0
  want, want_aux = fn(SHARED, units, jnp.ones(1))
  assert float(clipping.global_norm(want)) > 0.01  # A real delta.
  for junk in (np.nan, np.inf, -np.inf, 1e3):
    padded = jax.tree.map(np.copy, units)
    padded["example"]["x"][0, 2] = junk
    padded["example"]["x"][0, 5, 1] = np.nan
    out, aux = fn(SHARED, padded, jnp.ones(1))
    assert _dist(out, want) == 0.0, junk
    assert float(aux["num_nonfinite"]) == 0.0
    assert float(aux["loss_sum"]) == float(want_aux["loss_sum"])


def test_output_is_shared_params_only_and_each_unit_is_clipped():
  fn = jax.jit(_fn(0.1))
  units = _units(4)
  out, aux = fn(SHARED, units, jnp.ones(4), weights=jnp.full((4,), 2.0))
  assert jax.tree.structure(out) == jax.tree.structure(SHARED)
  assert float(clipping.global_norm(out)) <= 4 * 0.1 * (1 + 1e-5)
  assert float(aux["count"]) == 8.0  # weighted: users, not units.
  assert float(aux["num_clipped"]) == 8.0


def test_unit_without_data_has_zero_delta_and_no_clipping_when_none():
  fn = jax.jit(_fn(None))
  units = _units(2)
  units["mask"][0] = 0.0
  out, aux = fn(SHARED, jax.tree.map(lambda x: x[:1], units), jnp.ones(1))
  assert _dist(out, jax.tree.map(jnp.zeros_like, SHARED)) == 0.0
  big, aux = fn(SHARED, _units(1), jnp.ones(1))
  assert float(clipping.global_norm(big)) > 1.0  # unclipped (non-private).
  assert float(aux["num_clipped"]) == 0.0


def test_local_training_moves_params_towards_lower_loss():
  train = user_level.local_training(
      _loss, _init_local, shared_optimizer=optax.sgd(0.3),
      local_optimizer=optax.sgd(0.3), batch_size=4, epochs=20)
  unit = jax.tree.map(lambda x: x[0], _units(1))
  end, first_loss = jax.jit(train)(SHARED, unit)
  _, later_loss = jax.jit(train)(end, unit)
  assert float(later_loss) < float(first_loss)


def test_reconst_steps_train_only_the_local_params_first():
  unit = jax.tree.map(lambda x: x[0], _units(1))  # E=8, b=4: 2 steps/epoch.

  def delta(reconst_steps, epochs):
    train = user_level.local_training(
        _loss, _init_local, shared_optimizer=optax.sgd(0.5, momentum=0.9),
        local_optimizer=optax.sgd(0.5), batch_size=4, epochs=epochs,
        reconst_steps=reconst_steps)
    end, loss = jax.jit(train)(SHARED, unit)
    assert np.isfinite(float(loss))
    return _dist(end, SHARED)

  assert delta(2, epochs=1) == 0.0  # every local step reconstructs the head.
  assert delta(2, epochs=2) > 0.0  # the second epoch trains the shared.
  # Steps after reconstruction start from a trained head: a different delta.
  assert abs(delta(2, epochs=2) - delta(0, epochs=1)) > 1e-6


def test_init_from_data_sees_only_its_units_data_and_shared_params():
  """A data-dependent local init (e.g. an imprinted head) is called per unit
  with that unit's examples and mask and the current shared params."""
  seen = []

  def init(rng, shared, example, mask):
    del rng
    seen.append(example["x"].shape)
    # Masked mean input, projected: depends on the unit's own data only.
    mean_x = jnp.sum(example["x"] * mask[:, None], 0) / jnp.sum(mask)
    return {"h": jnp.outer(jnp.tanh(mean_x @ shared["w"]), jnp.ones(L))}

  def fn():
    train = user_level.local_training(
        _loss, init, shared_optimizer=optax.sgd(0.5),
        local_optimizer=optax.sgd(0.5), batch_size=4, init_from_data=True)
    return jax.jit(user_level.clipped_delta_sum(train, None))

  units = _units(3)
  base, _ = fn()(SHARED, units, jnp.ones(3))
  assert seen and seen[0] == (E, D)  # per unit, not the whole batch.
  # Changing unit 2's data leaves units 0-1's deltas alone: compare the sum
  # with unit 2 masked out before and after changing it.
  changed = jax.tree.map(np.copy, units)
  changed["example"]["x"][2] += 3.0
  mask = jnp.array([1.0, 1.0, 0.0])
  a, _ = fn()(SHARED, units, mask)
  b, _ = fn()(SHARED, changed, mask)
  assert _dist(a, b) == 0.0
  assert _dist(base, a) > 0.0


@pytest.mark.parametrize("clip,unit_batch", [(0.1, 0), (0.1, 2), (None, 0)])
def test_nonfinite_units_contribute_zero_and_are_counted(clip, unit_batch):
  """A real unit whose local training diverges (NaN / inf data) adds exactly
  zero: the sum equals the sum with that unit masked out, and it is counted
  (weighted like the other statistics) in aux["num_nonfinite"]."""
  train = user_level.local_training(
      _loss, _init_local, shared_optimizer=optax.sgd(5.0),
      local_optimizer=optax.sgd(5.0), batch_size=4, epochs=2)
  fn = jax.jit(user_level.clipped_delta_sum(train, clip,
                                            unit_batch=unit_batch))
  units = _units(4)
  units["example"]["x"][1, 0, 2] = np.nan
  units["example"]["x"][2, 3] = np.inf
  weights = jnp.array([1.0, 2.0, 3.0, 4.0])
  out, aux = fn(SHARED, units, jnp.ones(4), weights=weights)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  without = jnp.array([1.0, 0.0, 0.0, 1.0])
  want, want_aux = fn(SHARED, units, without, weights=weights)
  assert _dist(out, want) == 0.0
  assert float(aux["num_nonfinite"]) == 5.0  # users of units 1 and 2.
  assert float(want_aux["num_nonfinite"]) == 0.0
  assert float(aux["count"]) == 10.0
  for k in ("loss_sum", "grad_norm_sum", "num_clipped"):
    assert np.isfinite(float(aux[k]))
    assert float(aux[k]) == pytest.approx(float(want_aux[k]), rel=1e-6)
  _, aux1 = fn(SHARED, units, jnp.ones(4))  # default weights: units.
  assert float(aux1["num_nonfinite"]) == 2.0
