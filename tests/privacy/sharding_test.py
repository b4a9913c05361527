"""DP step under an 8-device mesh: same clipped sum, noise added once.

tests/conftest.py gives 8 simulated CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpjax.privacy import clipping
from dpjax.privacy import noise

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 (simulated) devices")


def _loss(params, example):
  return 0.5 * jnp.sum((example["x"] @ params["w"] - example["y"]) ** 2)


def _data(batch=32, d=64, k=32):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": 0.1 * jax.random.normal(keys[0], (d, k))}
  batch = {"x": jax.random.normal(keys[1], (batch, d)),
           "y": jax.random.normal(keys[2], (batch, k))}
  mask = jnp.ones((batch["x"].shape[0],)).at[-5:].set(0.0)
  return params, batch, mask


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("data",))


@pytest.mark.parametrize("microbatch_size", [None, 8])
def test_sharded_batch_gives_same_clipped_sum(microbatch_size):
  params, batch, mask = _data()
  fn = jax.jit(clipping.clipped_grad(_loss, 1.0,
                                     microbatch_size=microbatch_size))
  ref, ref_aux = fn(params, batch, mask)
  mesh = _mesh()
  data_sh = NamedSharding(mesh, P("data"))
  s_batch = jax.device_put(batch, data_sh)
  s_mask = jax.device_put(mask, data_sh)
  s_params = jax.device_put(params, NamedSharding(mesh, P()))
  assert len(s_batch["x"].sharding.device_set) == 8
  out, aux = fn(s_params, s_batch, s_mask)
  np.testing.assert_allclose(out["w"], ref["w"], rtol=1e-5, atol=1e-6)
  for k in ref_aux:
    assert float(aux[k]) == pytest.approx(float(ref_aux[k]), rel=1e-5)


def test_noise_added_once_on_reduced_sum():
  params, batch, mask = _data()
  sigma, c, b = 1.0, 1.0, 16.0
  grad_fn = clipping.clipped_grad(_loss, c)

  @jax.jit
  def step(params, batch, mask, key):
    s, _ = grad_fn(params, batch, mask)
    return noise.privatize(s, key, c, sigma, b), s

  key = jax.random.PRNGKey(5)
  ref_noisy, _ = step(params, batch, mask, key)
  mesh = _mesh()
  data_sh = NamedSharding(mesh, P("data"))
  noisy, clean = step(jax.device_put(params, NamedSharding(mesh, P())),
                      jax.device_put(batch, data_sh),
                      jax.device_put(mask, data_sh), key)
  # Same as single-device (so not one draw per device) ...
  np.testing.assert_allclose(noisy["w"], ref_noisy["w"], rtol=1e-5,
                             atol=1e-6)
  # ... and the noise has std sigma * C / B, not sqrt(8) times that.
  resid = np.asarray(noisy["w"] - clean["w"] / b)
  assert resid.std() == pytest.approx(sigma * c / b, rel=0.1)


def test_noise_independent_of_parameter_sharding():
  z = {"w": jnp.zeros((64, 48)), "b": jnp.zeros((16,))}
  key = jax.random.PRNGKey(11)
  f = jax.jit(lambda t, k: noise.privatize(t, k, 1.0, 1.0, 2.0))
  ref = f(z, key)
  mesh = _mesh()
  sharded = {"w": jax.device_put(z["w"], NamedSharding(mesh, P("data"))),
             "b": jax.device_put(z["b"], NamedSharding(mesh, P("data")))}
  out = f(sharded, key)
  assert len(out["w"].sharding.device_set) == 8
  np.testing.assert_array_equal(out["w"], ref["w"])
  np.testing.assert_array_equal(out["b"], ref["b"])
  # Distinct draws across shards (no shard repeats another's noise).
  rows = np.asarray(out["w"]).reshape(8, -1)
  assert len({r.tobytes() for r in rows}) == 8


@pytest.mark.parametrize("mechanism", ["bandmf", "blt"])
def test_correlated_noise_state_is_sharded_like_params(mechanism):
  """BandMF's past noise and BLT's buffers live in the optimizer state
  sharded like the params (jit keeps the params' sharding), and three
  correlated steps give the same values on 8 shards as on one device."""
  from dpjax import privacy  # pylint: disable=g-import-not-at-top
  if mechanism == "bandmf":
    tx = privacy.bandmf_noise(1.0, 1.0, 2.0, bands=3, seed=5)
  else:
    tx = privacy.blt_noise(1.0, 1.0, 2.0, privacy.blt.optimize(6, 2, 2), 6,
                           min_separation=2, seed=5)
  z = {"w": jnp.zeros((64, 48))}
  mesh = _mesh()
  shard = NamedSharding(mesh, P("data"))
  sharded = {"w": jax.device_put(z["w"], shard)}

  def three_steps(params):
    state, outs = tx.init(params), []
    for _ in range(3):
      out, state = tx.update(params, state)
      outs.append(out)
    return outs, state

  run = jax.jit(three_steps)
  ref_outs, _ = run(z)
  outs, state = run(sharded)
  buffers = state.past if mechanism == "bandmf" else state.buffers
  assert buffers
  for b in buffers:
    assert b["w"].sharding.is_equivalent_to(shard, 2)
  for got, want in zip(outs, ref_outs):
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, atol=1e-6)
  # Correlated, not repeated: each step's noise differs from the last.
  assert not np.allclose(outs[1]["w"], outs[2]["w"])
