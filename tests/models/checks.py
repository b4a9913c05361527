"""Shared assertions of the model tests."""

import jax
import numpy as np


def assert_vmap_grads_match_loop(loss, params, *batch, n=3, rtol=1e-4,
                                 atol=1e-6):
  """vmap of grad(loss) over examples equals grad on each example alone.

  Args:
    loss: (params, *one_example) -> scalar.
    params: the model's params.
    *batch: arrays with a leading batch axis, one per example argument.
    n: how many examples to compare.
  """
  grad = jax.jit(jax.grad(loss))
  in_axes = (None,) + (0,) * len(batch)
  vgrads = jax.jit(jax.vmap(grad, in_axes=in_axes))(params, *batch)
  for i in range(n):
    gi = grad(params, *(b[i] for b in batch))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a[i], b, rtol=rtol,
                                                atol=atol), vgrads, gi)
