"""Row helpers shared by every clipped sum (privacy/rows.py)."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.privacy import rows


def test_doctests():
  assert doctest.testmod(rows).failed == 0


def test_clip_factor_bounds_the_row_and_drops_non_finite():
  norms = jnp.array([0., 1., 2., 8., jnp.nan, jnp.inf])
  f = rows.clip_factor(norms, 2.0)
  np.testing.assert_array_equal(f, [1., 1., 1., .25, 0., 0.])
  g = rows.scale_factor(norms, 2.0, "normalize", 0.01)
  assert np.all(np.asarray(g[:4] * norms[:4]) < 2.0)
  np.testing.assert_array_equal(g[4:], [0., 0.])


def test_zero_rows_and_weighted_row_sum():
  """The helpers: dropped rows become exactly 0, kept rows are untouched."""
  g = {"a": jnp.array([[1., jnp.nan], [jnp.inf, 2.], [3., 4.]]),
       "b": jnp.arange(6.).reshape(3, 2, 1)}
  drop = jnp.array([True, False, False])
  z = jax.jit(rows.zero_rows)(g, drop)
  np.testing.assert_array_equal(z["a"], [[0., 0.], [jnp.inf, 2.], [3., 4.]])
  np.testing.assert_array_equal(z["b"][0], 0.0)
  np.testing.assert_array_equal(z["b"][1:], g["b"][1:])
  s = jax.jit(rows.weighted_row_sum)(
      g, jnp.array([0., 0., 2.]), jnp.array([False, False, True]))
  np.testing.assert_array_equal(s["a"], [6., 8.])
  np.testing.assert_array_equal(s["b"], [[8.], [10.]])
