"""Tests for dpjax.privacy.clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.privacy import clipping


def _loss(params, example):
  # Small MLP-ish loss with a nonlinearity so per-example grads differ.
  h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
  pred = h @ params["w2"]
  return jnp.sum((pred - example["y"]) ** 2)


def _setup(batch=8, seed=0, scale=3.0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {"w1": jax.random.normal(k[0], (4, 5)),
            "b1": jax.random.normal(k[1], (5,)),
            "w2": jax.random.normal(k[2], (5, 2))}
  batch = {"x": scale * jax.random.normal(k[3], (batch, 4)),
           "y": jax.random.normal(k[4], (batch, 2))}
  return params, batch


def _example(batch, i):
  return jax.tree_util.tree_map(lambda x: x[i], batch)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def test_per_example_grads_match_loop():
  params, batch = _setup()
  grads = clipping.per_example_grads(_loss)(params, batch)
  for i in range(8):
    ref = jax.grad(_loss)(params, _example(batch, i))
    np.testing.assert_allclose(_flat(_example(grads, i)), _flat(ref),
                               rtol=1e-4, atol=1e-4)


def test_clip_pytree_bound_and_identity():
  big = {"a": jnp.array([30.0, 40.0]), "b": jnp.ones((3,))}
  clipped, norm = clipping.clip_pytree(big, 2.0)
  assert float(norm) == pytest.approx(np.sqrt(2503.0), rel=1e-6)
  assert float(clipping.global_norm(clipped)) == pytest.approx(2.0, rel=1e-5)
  small = {"a": jnp.array([0.3, 0.4])}
  same, _ = clipping.clip_pytree(small, 2.0)
  np.testing.assert_array_equal(same["a"], small["a"])
  zero, n0 = clipping.clip_pytree({"a": jnp.zeros(3)}, 1.0)
  assert float(n0) == 0.0 and not np.any(np.isnan(zero["a"]))


@pytest.mark.parametrize("mode", ["clip", "normalize"])
def test_clipped_sum_matches_loop_and_bound(mode):
  params, batch = _setup()
  c, gamma = 1.0, 0.01
  s, aux = jax.jit(clipping.clipped_grad(_loss, c, clipping=mode))(
      params, batch, jnp.ones(8))
  ref, norms = 0.0, []
  for i in range(8):
    g = _flat(jax.grad(_loss)(params, _example(batch, i)))
    n = np.linalg.norm(g)
    norms.append(n)
    f = min(1.0, c / n) if mode == "clip" else c / (n + gamma)
    assert np.linalg.norm(f * g) <= c * (1 + 1e-6)
    ref = ref + f * g
  np.testing.assert_allclose(_flat(s), ref, rtol=1e-4, atol=1e-5)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s))
  assert float(aux["count"]) == 8
  assert float(aux["grad_norm_sum"]) == pytest.approx(sum(norms), rel=1e-4)
  assert float(aux["num_clipped"]) == sum(n > c for n in norms)
  losses = [float(_loss(params, _example(batch, i))) for i in range(8)]
  assert float(aux["loss_sum"]) == pytest.approx(sum(losses), rel=1e-4)
  assert set(aux) == {"loss_sum", "grad_norm_sum", "num_clipped", "count",
                      "num_nonfinite"}
  assert float(aux["num_nonfinite"]) == 0
  assert all(v.shape == () for v in aux.values())


def test_example_under_clip_norm_is_unchanged():
  params, batch = _setup(batch=1, scale=0.01)
  g = _flat(jax.grad(_loss)(params, _example(batch, 0)))
  c = 10.0 * np.linalg.norm(g)
  s, aux = clipping.clipped_grad(_loss, c)(params, batch, jnp.ones(1))
  np.testing.assert_allclose(_flat(s), g, rtol=1e-6)
  assert float(aux["num_clipped"]) == 0


def test_masked_rows_contribute_exactly_zero_even_nan():
  params, batch = _setup()
  mask = jnp.array([1, 1, 0, 1, 0, 1, 1, 0], jnp.float32)
  fn = jax.jit(clipping.clipped_grad(_loss, 1.0))
  s1, aux1 = fn(params, batch, mask)
  bad = {"x": batch["x"].at[2].set(jnp.nan).at[4].set(jnp.inf)
              .at[7].set(1e30),
         "y": batch["y"].at[2].set(jnp.nan)}
  s2, aux2 = fn(params, bad, mask)
  np.testing.assert_array_equal(_flat(s1), _flat(s2))
  for k in aux1:
    assert float(aux1[k]) == float(aux2[k])
  assert float(aux2["count"]) == 5
  # And equals the sum over the real rows only.
  keep = np.flatnonzero(np.asarray(mask))
  sub = jax.tree_util.tree_map(lambda x: x[keep], batch)
  s3, _ = fn(params, sub, jnp.ones(len(keep)))
  np.testing.assert_allclose(_flat(s1), _flat(s3), rtol=1e-5, atol=1e-6)


def _nonfinite_batch(batch):
  """Row 1: NaN input (NaN gradient). Row 3: one target 3e38, so one
  dloss/dpred overflows to -inf (+-inf gradient coordinates, inf loss)."""
  return {"x": batch["x"].at[1].set(jnp.nan),
          "y": batch["y"].at[3, 0].set(3e38)}


@pytest.mark.parametrize("micro", [None, 2, 4])
@pytest.mark.parametrize("mode", ["clip", "normalize"])
def test_nonfinite_real_rows_contribute_exactly_zero(mode, micro):
  params, batch = _setup()
  mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
  bad = _nonfinite_batch(batch)
  grads = clipping.per_example_grads(_loss)(params, bad)
  norms = np.asarray(jax.vmap(clipping.global_norm)(grads))
  # A NaN norm (factor 1) made the old sum NaN.
  assert np.isnan(norms[1]) and not np.isfinite(norms[3])
  assert np.any(np.isinf(_flat(_example(grads, 3))))
  fn = jax.jit(clipping.clipped_grad(_loss, 1.0, clipping=mode,
                                     microbatch_size=micro))
  s, aux = fn(params, bad, mask)
  without = mask.at[1].set(0.0).at[3].set(0.0)
  want, want_aux = fn(params, bad, without)
  assert np.all(np.isfinite(_flat(s)))
  np.testing.assert_allclose(_flat(s), _flat(want), rtol=1e-6, atol=1e-7)
  assert float(aux["num_nonfinite"]) == 2.0
  assert float(want_aux["num_nonfinite"]) == 0.0
  assert float(aux["count"]) == 6.0 and float(want_aux["count"]) == 4.0
  for k in ("loss_sum", "grad_norm_sum", "num_clipped"):
    assert np.isfinite(float(aux[k]))
    assert float(aux[k]) == pytest.approx(float(want_aux[k]), rel=1e-6)
  # Also equal to the batch without those rows at all.
  keep = [0, 4, 5, 7]
  sub = jax.tree_util.tree_map(lambda x: x[np.array(keep)], batch)
  ref, _ = clipping.clipped_grad(_loss, 1.0, clipping=mode)(
      params, sub, jnp.ones(4))
  np.testing.assert_allclose(_flat(s), _flat(ref), rtol=1e-5, atol=1e-6)


def test_exactly_inf_and_nan_gradients_contribute_zero():
  """Linear loss: the per-example gradient IS the input row. An inf norm gave
  the old code factor C / inf = 0 and 0 * inf = NaN in the sum."""
  fn = clipping.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
  x = jnp.array([[3., 4.], [jnp.inf, 1.], [jnp.nan, 1.], [-jnp.inf, 0.],
                 [.3, .4]])
  s, aux = fn(jnp.zeros(2), x, jnp.ones(5))
  np.testing.assert_allclose(np.asarray(s), [0.9, 1.2], rtol=1e-6)
  assert float(aux["num_nonfinite"]) == 3.0
  assert float(aux["num_clipped"]) == 1.0
  assert float(aux["grad_norm_sum"]) == pytest.approx(5.5, rel=1e-6)
  assert float(aux["count"]) == 5.0


def test_clip_pytree_zeroes_a_nonfinite_tree():
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    clipped, norm = clipping.clip_pytree(
        {"a": jnp.array([1.0, bad]), "b": jnp.ones(2)}, 1.0)
    assert not np.isfinite(float(norm))
    assert np.all(np.asarray(clipped["a"]) == 0.0)
    assert np.all(np.asarray(clipped["b"]) == 0.0)


@pytest.mark.parametrize("mode", ["clip", "normalize"])
def test_microbatched_equals_full(mode):
  params, batch = _setup(batch=12)
  mask = jnp.array([1.0] * 9 + [0.0] * 3)
  full, aux_f = clipping.clipped_grad(_loss, 0.5, clipping=mode)(
      params, batch, mask)
  for micro in (1, 3, 4, 6, 12):
    mb, aux_m = jax.jit(clipping.clipped_grad(
        _loss, 0.5, clipping=mode, microbatch_size=micro))(params, batch, mask)
    np.testing.assert_allclose(_flat(mb), _flat(full), rtol=1e-5, atol=1e-6)
    for k in aux_f:
      assert float(aux_m[k]) == pytest.approx(float(aux_f[k]), rel=1e-5)


def test_microbatch_not_dividing_raises():
  params, batch = _setup(batch=10)
  fn = clipping.clipped_grad(_loss, 1.0, microbatch_size=4)
  with pytest.raises(ValueError, match="10.*4"):
    fn(params, batch, jnp.ones(10))


def test_bad_mode_raises():
  with pytest.raises(ValueError, match="clipping"):
    clipping.clipped_grad(_loss, 1.0, clipping="bogus")
