"""Tests for dpjax.privacy.noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.privacy import noise


def _zeros():
  return {"a": jnp.zeros((200, 250)), "b": jnp.zeros((50_000,))}


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("sigma,c,b", [(1.0, 1.0, 10.0), (2.5, 0.1, 256.0)])
def test_privatize_std(sigma, c, b):
  out = _flat(noise.privatize(_zeros(), jax.random.PRNGKey(3), c, sigma, b))
  expected = sigma * c / b
  assert out.std() == pytest.approx(expected, rel=0.02)
  assert abs(out.mean()) < 5 * expected / np.sqrt(out.size)
  assert noise.noise_std_per_coordinate(c, sigma, b) == pytest.approx(expected)


def test_privatize_divides_sum_and_leaves_independent():
  s = {"a": jnp.full((4,), 8.0), "b": jnp.full((1000,), 8.0)}
  out = noise.privatize(s, jax.random.PRNGKey(0), 1.0, 0.0, 4.0)
  np.testing.assert_allclose(_flat(out), 2.0)
  # Same-shaped leaves get different noise (key split per leaf).
  z = {"a": jnp.zeros((1000,)), "b": jnp.zeros((1000,))}
  out = noise.privatize(z, jax.random.PRNGKey(0), 1.0, 1.0, 1.0)
  assert abs(np.corrcoef(out["a"], out["b"])[0, 1]) < 0.15
  # Leaves drawn together by shape get exactly leaf i's own key's draw.
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  for i, name in enumerate(("a", "b")):
    np.testing.assert_array_equal(
        out[name], jax.random.normal(keys[i], (1000,)))


def test_add_noise_steps_differ_and_reproduce():
  tx = noise.add_noise(1.0, 1.0, 100.0, seed=7)
  z = {"w": jnp.zeros((10_000,))}
  state = tx.init(z)
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  upd0, state = jax.jit(tx.update)(z, state)
  upd1, state = jax.jit(tx.update)(z, state)
  assert int(state.count) == 2
  assert abs(np.corrcoef(upd0["w"], upd1["w"])[0, 1]) < 0.05
  assert np.std(upd0["w"]) == pytest.approx(0.01, rel=0.05)
  # Same seed and step reproduce; another seed differs.
  again, _ = tx.update(z, tx.init(z))
  np.testing.assert_array_equal(again["w"], upd0["w"])
  tx8 = noise.add_noise(1.0, 1.0, 100.0, seed=8)
  other, _ = tx8.update(z, tx8.init(z))
  assert not np.allclose(other["w"], upd0["w"])
  # The key is fold_in(rng_key, count), rng_key = PRNGKey(seed) in the state.
  np.testing.assert_array_equal(state.rng_key, jax.random.PRNGKey(7))
  direct = noise.privatize(z, jax.random.fold_in(jax.random.PRNGKey(7), 1),
                           1.0, 1.0, 100.0)
  np.testing.assert_array_equal(direct["w"], upd1["w"])
  # A typed key works like its raw data.
  typed = noise.add_noise(1.0, 1.0, 100.0, seed=jax.random.key(7))
  np.testing.assert_array_equal(typed.update(z, typed.init(z))[0]["w"],
                                upd0["w"])


def test_default_noise_key_is_secret_full_width_and_fresh_per_init():
  """seed=None: every init draws OS entropy over the WHOLE raw key (both
  uint32 words, not a 31-bit seed), so re-initialising the optimizer state
  never replays earlier noise."""
  z = {"w": jnp.zeros((1000,))}
  for tx in (noise.add_noise(1.0, 1.0, 10.0),
             noise.dp_aggregate(1.0, 1.0, expected_batch_size=10.0)):
    keys = np.stack([np.asarray(tx.init(z).rng_key) for _ in range(64)])
    assert keys.dtype == np.uint32 and keys.shape == (64, 2)
    assert len({tuple(k) for k in keys}) == 64
    # PRNGKey(int) leaves word 0 at 0 and word 1 below 2**31; OS entropy
    # sets both words' high bits about half the time.
    for word in (0, 1):
      assert 10 < int(np.sum(keys[:, word] >= 2**31)) < 54
  tx = noise.add_noise(1.0, 1.0, 10.0)
  first, _ = tx.update(z, tx.init(z))
  again, _ = tx.update(z, tx.init(z))  # Re-initialised: fresh noise.
  assert abs(np.corrcoef(first["w"], again["w"])[0, 1]) < 0.15


def test_dp_aggregate_divides_by_expected_not_realised():
  grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0], [1.0, 0.0]])}
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  tx = noise.dp_aggregate(1.0, 0.0, seed=0, expected_batch_size=10.0)
  upd, state = tx.update(grads, tx.init(None), mask=mask)
  # Clipped: [.6, .8] + [.3, .4] + [.6, .8] = [1.5, 2.0]; / 10 (not / 3).
  np.testing.assert_allclose(upd["w"], [0.15, 0.2], rtol=1e-6)
  assert int(state.count) == 1
  # Default expected size = leading dim, and NaN in a masked row is ignored.
  tx = noise.dp_aggregate(1.0, 0.0, seed=0)
  bad = {"w": grads["w"].at[3].set(jnp.nan)}
  upd, _ = tx.update(bad, tx.init(None), mask=mask)
  np.testing.assert_allclose(upd["w"], [1.5 / 4, 2.0 / 4], rtol=1e-6)


def test_dp_aggregate_noise_and_chain():
  grads = {"w": jnp.zeros((3, 20_000))}
  tx = optax.chain(noise.dp_aggregate(2.0, 1.5, seed=1,
                                      expected_batch_size=30.0),
                   optax.sgd(1.0))
  upd, _ = jax.jit(tx.update)(grads, tx.init({"w": jnp.zeros(20_000)}))
  assert np.std(upd["w"]) == pytest.approx(1.5 * 2.0 / 30.0, rel=0.05)


def test_rejects_bad_args():
  with pytest.raises(ValueError):
    noise.privatize(_zeros(), jax.random.PRNGKey(0), 1.0, -1.0, 1.0)
  with pytest.raises(ValueError):
    noise.privatize(_zeros(), jax.random.PRNGKey(0), 1.0, 1.0, 0.0)
