"""The owned DP step: one noise draw per step, expected-batch division, masks,
and the same result on 1 and 8 devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dpjax import privacy
from dpjax.train import mesh as mesh_lib
from dpjax.train import step as step_lib

DIM = 4096


def loss_fn(params, example):
  # Gradient w.r.t. w is example["x"]: per-example grads are the inputs.
  return jnp.vdot(params["w"], example["x"])


def _tx(sigma=1.0, clip=1.0, expected=8.0, opt=None, seed=0):
  """The loop's sum function and step optimizer of a private phase."""
  sum_fn = step_lib.private_sum_fn(loss_fn, clip)
  return sum_fn, step_lib.phase_optimizer(
      opt or optax.sgd(1.0), noise=privacy.add_noise(
          sum_fn, sigma, expected, seed=jax.random.PRNGKey(seed)))


def _state(params, seed=0):
  return step_lib.TrainState(jnp.zeros((), jnp.int32), params,
                             _tx(seed=seed)[1].init(params),
                             jax.random.PRNGKey(99))


def _run_step(state, x, mask, *, sigma, clip=1.0, expected=8.0, opt=None):
  sum_fn, tx = _tx(sigma, clip, expected, opt)
  acc = step_lib.accumulate(sum_fn, state.params,
                            step_lib.zeros_accumulator(state.params),
                            {"x": x}, mask)
  return step_lib.apply(state, acc, optimizer=tx)


def test_noiseless_update_is_clipped_sum_over_expected_batch():
  x = jax.random.normal(jax.random.PRNGKey(1), (6, DIM))
  mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
  params = {"w": jnp.zeros(DIM)}
  new, metrics = _run_step(_state(params), x, mask, sigma=0.0,
                           expected=10.0)
  norms = jnp.linalg.norm(x, axis=1, keepdims=True)
  clipped = x * jnp.minimum(1.0, 1.0 / norms)
  want = -(clipped[:4].sum(0)) / 10.0  # expected batch 10, realised 4.
  np.testing.assert_allclose(new.params["w"], want, rtol=1e-5, atol=1e-7)
  assert int(new.step) == 1
  assert float(metrics["clipped_fraction"]) == 1.0  # all norms ~64 > 1.


def test_nonfinite_real_rows_add_zero_and_are_counted_privately():
  """A REAL row whose gradient is NaN or inf must not turn the step into NaN
  (its presence would be visible): it adds zero; the count is private/."""
  x = jax.random.normal(jax.random.PRNGKey(1), (4, DIM))
  mask = jnp.ones((4,), jnp.float32)
  params = {"w": jnp.zeros(DIM)}
  bad = x.at[1, 0].set(jnp.nan).at[2, 5].set(jnp.inf)
  got, metrics = _run_step(_state(params), bad, mask,
                           sigma=1.0)
  drop = jnp.array([1, 0, 0, 1], jnp.float32)
  want, _ = _run_step(_state(params), x, drop, sigma=1.0)
  assert np.all(np.isfinite(got.params["w"]))
  np.testing.assert_allclose(got.params["w"], want.params["w"], rtol=1e-6,
                             atol=1e-7)
  assert float(metrics["nonfinite_rows"]) == 2.0


def test_padding_rows_never_leak():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, DIM))
  mask = jnp.array([1, 1, 0, 0], jnp.float32)
  params = {"w": jnp.zeros(DIM)}
  a, _ = _run_step(_state(params), x, mask, sigma=1.0)
  x2 = x.at[2:].set(jnp.nan)
  b, _ = _run_step(_state(params), x2, mask, sigma=1.0)
  np.testing.assert_array_equal(a.params["w"], b.params["w"])


def test_noise_std_and_fresh_key_every_step():
  params = {"w": jnp.zeros(DIM)}
  x = jnp.zeros((8, DIM))
  mask = jnp.ones(8)
  sigma, clip, expected = 2.0, 0.5, 8.0
  state = _state(params)
  s1, _ = _run_step(state, x, mask, sigma=sigma, clip=clip, expected=expected)
  d1 = np.asarray(s1.params["w"])
  s2, _ = _run_step(s1, x, mask, sigma=sigma, clip=clip, expected=expected)
  d2 = np.asarray(s2.params["w"]) - d1
  want = sigma * clip / expected
  for d in (d1, d2):  # zero gradients: the update is the noise alone.
    assert abs(d.std() / want - 1) < 0.05
  assert abs(np.corrcoef(d1, d2)[0, 1]) < 0.05  # steps draw fresh noise.
  again, _ = _run_step(state, x, mask, sigma=sigma, clip=clip,
                       expected=expected)
  np.testing.assert_array_equal(again.params["w"], d1)  # (key, step) fixed.
  other, _ = _run_step(_state(params, seed=1), x, mask,
                       sigma=sigma, clip=clip, expected=expected)
  assert abs(np.corrcoef(d1, other.params["w"])[0, 1]) < 0.05


def test_eight_devices_same_sum_and_single_noise_draw():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  mesh = mesh_lib.make_mesh()
  x = jax.random.normal(jax.random.PRNGKey(3), (16, DIM))
  mask = jnp.ones(16).at[13:].set(0.0)
  params = {"w": jnp.zeros(DIM)}
  state = _state(params)
  sigma = 1.0
  ref, _ = _run_step(state, x, mask, sigma=sigma, expected=16.0)
  xs = jax.device_put(x, mesh_lib.batch_sharding(mesh))
  ms = jax.device_put(mask, mesh_lib.batch_sharding(mesh))
  run = jax.jit(functools.partial(_run_step, sigma=sigma, expected=16.0))
  sharded, _ = run(state, xs, ms)
  np.testing.assert_allclose(sharded.params["w"], ref.params["w"], rtol=1e-5,
                             atol=1e-6)
  # And with the parameters FSDP-sharded over the 8 devices: the noise is
  # still one draw per coordinate (same values, not 8 draws summed).
  fmesh = mesh_lib.make_mesh(data=1, fsdp=8)
  fparams = jax.device_put(params, mesh_lib.param_shardings(params, fmesh))
  assert fparams["w"].sharding.spec == P("fsdp")
  fstate = _state(fparams)
  fsharded, _ = run(fstate, jax.device_put(x, mesh_lib.batch_sharding(fmesh)),
                    jax.device_put(mask, mesh_lib.batch_sharding(fmesh)))
  np.testing.assert_allclose(fsharded.params["w"], ref.params["w"], rtol=1e-5,
                             atol=1e-6)


def test_loop_step_is_the_library_recipe_bit_for_bit():
  """The loop's jitted accumulate + apply (one microbatch) and the README's
  library recipe (clipped_grad -> chain(add_noise, adamw)) give identical
  params and optimizer state over three steps: one DP path."""
  from dpjax import privacy  # pylint: disable=g-import-not-at-top
  def loss(params, example):
    return jnp.tanh(jnp.vdot(params["w"], example["x"])) ** 2
  params = {"w": 0.01 * jax.random.normal(jax.random.PRNGKey(0), (DIM,))}
  xs = jax.random.normal(jax.random.PRNGKey(1), (3, 8, DIM))
  mask = jnp.ones(8).at[6:].set(0.0)
  key = jax.random.PRNGKey(5)
  # The library recipe (README, "Library use").
  sum_fn = privacy.clipped_grad(loss, 1.0)
  tx = optax.chain(privacy.add_noise(sum_fn, 1.3, 10.0, seed=key),
                   optax.adamw(1e-2))

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def lib_step(params, opt_state, batch, mask):
    grads, _ = jax.jit(sum_fn)(params, batch, mask)
    return update(params, opt_state, grads)

  # The loop's path: its sum function, phase optimizer, jitted steps.
  loop_sum = step_lib.private_sum_fn(loss, 1.0)
  loop_tx = step_lib.phase_optimizer(
      optax.adamw(1e-2), noise=privacy.add_noise(loop_sum, 1.3, 10.0,
                                                 seed=key))
  accumulate = jax.jit(functools.partial(step_lib.accumulate, loop_sum))
  apply = jax.jit(functools.partial(step_lib.apply, optimizer=loop_tx))
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params,
                              loop_tx.init(params), jax.random.PRNGKey(9))
  lib_params, lib_opt = params, tx.init(params)
  for x in xs:
    lib_params, lib_opt = lib_step(lib_params, lib_opt, {"x": x}, mask)
    acc = accumulate(state.params, step_lib.zeros_accumulator(params),
                     {"x": x}, mask)
    state, _ = apply(state, acc)
  np.testing.assert_array_equal(state.params["w"], lib_params["w"])
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(lib_opt)):
    np.testing.assert_array_equal(a, b)


def test_nonprivate_sum_matches_grad_of_masked_mean():
  x = jax.random.normal(jax.random.PRNGKey(1), (5, DIM))
  mask = jnp.array([1, 1, 1, 0, 0], jnp.float32)
  params = {"w": jnp.ones(DIM)}
  g, aux = step_lib.nonprivate_sum_fn(loss_fn)(params, {"x": x}, mask)
  np.testing.assert_allclose(g["w"], x[:3].sum(0), rtol=1e-5)
  assert float(aux["count"]) == 3.0


def test_nonprivate_inner_microbatch_scans_chunks_to_the_same_sum():
  x = jax.random.normal(jax.random.PRNGKey(2), (6, DIM))
  mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
  params = {"w": jnp.ones(DIM)}
  whole = step_lib.nonprivate_sum_fn(loss_fn)(params, {"x": x}, mask)
  chunked = step_lib.nonprivate_sum_fn(loss_fn, inner_microbatch=2)
  assert "scan" in str(jax.make_jaxpr(chunked)(params, {"x": x}, mask))
  got = chunked(params, {"x": x}, mask)
  np.testing.assert_allclose(got[0]["w"], whole[0]["w"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1]["loss_sum"], whole[1]["loss_sum"],
                             rtol=1e-5)
  assert float(got[1]["count"]) == 4.0


def test_mesh_errors_name_the_field():
  with pytest.raises(ValueError, match="mesh.fsdp=3"):
    mesh_lib.make_mesh(fsdp=3)

