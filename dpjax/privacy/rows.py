"""Row helpers shared by every clipped sum: clip factors, the weighted row
sum and the aggregate aux.

A "row" is one example (or one user) along the leading batch axis of a
pytree of per-row gradients. ``clipping`` (vmap path), ``ghost`` (fast
clipping), ``noise.dp_aggregate`` and ``user_level`` all clip and sum rows
with these functions, so every path treats padding and non-finite rows the
same way: factor 0, row zeroed before the sum (0 * NaN is NaN), so such a row
adds exactly zero. Pure JAX (no Flax), so ``import dpjax.privacy`` stays
Flax-free. Only aggregates leave these functions, never a per-row value.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

PyTree = Any


def clip_factor(norm: jax.Array, l2_clip_norm: float) -> jax.Array:
  """``min(1, C / norm)``; 1 where ``norm == 0``; 0 where it is NaN/inf.

  A row scaled by its factor has norm <= C. The factor alone does not zero a
  non-finite row (0 * NaN is NaN): callers also zero that row
  (``zero_rows`` / ``weighted_row_sum``).

  >>> clip_factor(jnp.array([0., .5, 4., jnp.nan]), 2.0).tolist()
  [1.0, 1.0, 0.5, 0.0]
  """
  big = norm > l2_clip_norm
  safe = jnp.where(big, norm, 1.0)
  factor = jnp.where(big, l2_clip_norm / safe, 1.0)
  return jnp.where(jnp.isfinite(norm), factor, 0.0)


def scale_factor(norm: jax.Array, l2_clip_norm: float, clipping: str,
                 normalize_gamma: float) -> jax.Array:
  """Per-row factor of "clip" / "normalize"; 0 where ``norm`` is NaN/inf.

  "clip": ``clip_factor`` (scaled norm <= C); "normalize": fastDP's automatic
  clipping ``C / (norm + gamma)`` (scaled norm < C).
  """
  if clipping == "clip":
    return clip_factor(norm, l2_clip_norm)
  # fastDP automatic clipping: ||g * factor|| < C.
  return jnp.where(jnp.isfinite(norm), l2_clip_norm / (norm + normalize_gamma),
                   0.0)


def zero_rows(tree: PyTree, drop: jax.Array) -> PyTree:
  """Rows ``i`` with ``drop[i]`` of every leaf set to exactly 0, in place.

  ``where(row kept, g, 0)`` as the body of a loop that runs once if some row
  is dropped and never otherwise: the loop carry is updated in place, so the
  common all-finite step reads and writes no second ``B x params`` buffer
  (a plain ``where`` costs one more pass; a ``lax.cond`` a second buffer).
  Elementwise, so it shards like the rows.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)

  def body(_, xs):
    return [jnp.where(~drop.reshape((-1,) + (1,) * (x.ndim - 1)), x,
                      jnp.zeros((), x.dtype)) for x in xs]

  once = jnp.any(drop).astype(jnp.int32)
  return treedef.unflatten(jax.lax.fori_loop(0, once, body, leaves))


def weighted_row_sum(tree: PyTree, factor: jax.Array,
                     finite: Optional[jax.Array] = None) -> PyTree:
  """``sum_i factor[i] * tree[i]`` per leaf (float32), by one contraction.

  Rows where ``finite`` is False are zeroed first (``zero_rows``), so their
  NaN/inf cannot reach the sum (0 * NaN is NaN). Exactness: a row with
  ``factor[i] == 0`` and finite coordinates adds exactly 0. So callers pass
  ``factor`` 0 for every row that must not count (padding, non-finite) and
  ``finite`` False for every row that may hold a NaN/inf (a non-finite norm
  flags it); ``finite=None`` states that all rows are finite.

  >>> weighted_row_sum(jnp.array([[1., 2.], [jnp.nan, 1.], [3., 4.]]),
  ...                  jnp.array([1., 0., .5]),
  ...                  jnp.array([True, False, True])).tolist()
  [2.5, 4.0]
  """
  if finite is not None:
    tree = zero_rows(tree, ~finite)
  return jax.tree_util.tree_map(
      lambda g: jnp.tensordot(factor, g.astype(jnp.float32), axes=1), tree)


def clip_aux(losses: jax.Array, norms: jax.Array, real: jax.Array,
             finite: jax.Array, l2_clip_norm: float) -> dict:
  """Aggregate float32 scalars over real rows; NaN/inf never enter a sum.

  ``loss_sum`` (finite losses), ``grad_norm_sum`` (finite pre-clip norms),
  ``num_clipped`` (finite rows with norm > C), ``count`` (real rows),
  ``num_nonfinite`` (real rows with a NaN/inf norm). Not private: log them
  as such.
  """
  keep = real & finite
  losses = losses.astype(jnp.float32)
  return {
      "loss_sum": jnp.sum(jnp.where(real & jnp.isfinite(losses), losses, 0.0)),
      "grad_norm_sum": jnp.sum(jnp.where(keep, norms, 0.0)),
      "num_clipped": jnp.sum(jnp.where(keep & (norms > l2_clip_norm), 1.0,
                                       0.0)),
      "count": jnp.sum(jnp.where(real, 1.0, 0.0)),
      "num_nonfinite": jnp.sum(jnp.where(real & ~finite, 1.0, 0.0)),
  }
