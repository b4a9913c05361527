"""Gaussian noise for DP-SGD as optax GradientTransformations.

The DP step is: clipped SUM of per-example gradients (``clipping``) -> ONE
Gaussian draw N(0, (sigma * C)^2) per coordinate -> divide by the EXPECTED
batch size q * N (dividing by the realised size would leak it) -> optimizer.

Keys: the transforms keep a root key in their state (default: OS entropy
filling the whole key, secret); step t's key is ``fold_in(root, t)``, split
once per leaf in a fixed (tree-flatten) order, so it never repeats across
steps.
Sharding: call ``privatize`` / ``add_noise`` on the globally reduced sum
(under ``jit`` the sum over a batch sharded on "data" is already global), so
noise is added once, not once per device. With jax's partitionable threefry
(the default since jax 0.5) the draws do not depend on how parameters are
sharded: each coordinate gets exactly one independent draw.
"""

import os
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.privacy import clipping
from dpjax.privacy import redact
from dpjax.privacy import rows

PyTree = Any


def noise_std_per_coordinate(l2_clip_norm: float, noise_multiplier: float,
                             expected_batch_size: float) -> float:
  """Std of the noise in the averaged update: sigma * C / expected_batch.

  >>> noise_std_per_coordinate(1.0, 2.0, 100)
  0.02
  """
  return noise_multiplier * l2_clip_norm / expected_batch_size


def privatize(clipped_sum: PyTree, key: jax.Array, l2_clip_norm: float,
              noise_multiplier: float, expected_batch_size: float) -> PyTree:
  """Adds one Gaussian draw per coordinate to a clipped sum and averages.

  Formal guarantees: if ``clipped_sum`` is a sum of per-example contributions
  of L2 norm <= C (add/remove-one sensitivity C), the output is the Gaussian
  mechanism with noise multiplier sigma; with Poisson sampling at rate q over
  T steps, its privacy is ``accounting.epsilon(sigma, q, T, delta)``. The
  division by ``expected_batch_size`` (a public constant) is post-processing.
  ``key`` must be fresh for every step (e.g. ``fold_in(PRNGKey(seed), step)``).

  >>> out = privatize({"w": jnp.zeros(3)}, jax.random.PRNGKey(0), 1.0, 0.0,
  ...                 4.0)
  >>> out["w"].tolist()
  [0.0, 0.0, 0.0]

  Args:
    clipped_sum: pytree, the (globally reduced) sum of clipped gradients.
    key: raw PRNG key (uint32[2]) of this step.
    l2_clip_norm: clip norm C.
    noise_multiplier: sigma >= 0 (0 means no noise and no privacy).
    expected_batch_size: q * N, NOT the realised batch size.

  Returns:
    Pytree like ``clipped_sum`` (float32 or wider):
    ``(clipped_sum + N(0, (sigma C)^2)) / expected_batch_size``.
  """
  if noise_multiplier < 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
  if expected_batch_size <= 0:
    raise ValueError(
        f"expected_batch_size must be > 0, got {expected_batch_size}.")
  std = noise_multiplier * l2_clip_norm
  z = standard_normal_like(clipped_sum, key)
  return jax.tree_util.tree_map(
      lambda leaf, n: (leaf.astype(n.dtype) + std * n) / expected_batch_size,
      clipped_sum, z)


def standard_normal_like(tree: PyTree, key: jax.Array) -> PyTree:
  """One independent N(0, 1) draw per coordinate of `tree` (float32 or
  wider, like each leaf promoted): the z of step key `key` that
  ``privatize`` scales by sigma C, and that correlated-noise mechanisms
  (``bandmf``) combine across steps.

  Leaf i's draw is normal(split(key, n_leaves)[i], shape_i). Leaves of one
  shape and dtype draw together, vmapped over their keys (the same values
  as one call per leaf): a ViT-B has ~10 distinct shapes among ~180 leaves,
  and each random op costs compile time (jit of this function on a ViT-B's
  leaves: 34 s per leaf, 15 s grouped, on a loaded 2-core CPU).
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  dtypes = [jnp.promote_types(leaf.dtype, jnp.float32) for leaf in leaves]
  groups: dict[tuple, list[int]] = {}
  for i, (leaf, dtype) in enumerate(zip(leaves, dtypes)):
    groups.setdefault((leaf.shape, dtype), []).append(i)
  draws = [None] * len(leaves)
  for (shape, dtype), idx in groups.items():
    group_keys = jnp.stack([keys[i] for i in idx])  # Static slices.
    batch = jax.vmap(lambda k, s=shape, d=dtype: jax.random.normal(k, s, d))(
        group_keys)
    for j, i in enumerate(idx):
      draws[i] = batch[j]
  return jax.tree_util.tree_unflatten(treedef, draws)


class AddNoiseState(NamedTuple):
  """State of ``add_noise`` / ``dp_aggregate`` (optax's ``AddNoiseState``
  shape): the number of updates so far and the secret root key; step t's
  key is ``fold_in(rng_key, count)``."""
  count: jax.Array  # int32 scalar
  rng_key: jax.Array  # raw PRNG key (uint32[2] for threefry)
  __repr__ = redact.namedtuple_repr("rng_key")  # Never print the key.


Seed = Union[int, jax.Array, None]


def secret_key() -> np.ndarray:
  """A raw PRNG key of jax's default implementation (uint32[2] for
  threefry) filled entirely from OS entropy: secret and full-width, unlike
  ``PRNGKey(int)`` of a 32-bit seed.

  >>> secret_key().dtype, secret_key().shape
  (dtype('uint32'), (2,))
  """
  n = int(jax.random.key_data(jax.random.key(0)).shape[-1])
  return np.frombuffer(os.urandom(4 * n), np.uint32).copy()


def _root_key(seed: Seed) -> jax.Array:
  """A raw PRNG key: OS entropy over the whole key (None), PRNGKey(int),
  or the given key (typed keys are unwrapped to raw key data)."""
  if seed is None:
    return jnp.asarray(secret_key())
  if isinstance(seed, (int, np.integer)):
    return jax.random.PRNGKey(int(seed))
  if jnp.issubdtype(jnp.asarray(seed).dtype, jax.dtypes.prng_key):
    return jax.random.key_data(seed)
  return jnp.asarray(seed, jnp.uint32)


def init_state(seed: Seed, count: int = 0) -> AddNoiseState:
  """The noise state at update `count`, keyed by `seed` (None: OS entropy)."""
  return AddNoiseState(count=jnp.asarray(count, jnp.int32),
                       rng_key=_root_key(seed))


def _step_key(state: AddNoiseState) -> jax.Array:
  return jax.random.fold_in(state.rng_key, state.count)


Sensitivity = Union[float, clipping.BoundedSum]


def l2_sensitivity(sensitivity: Sensitivity) -> float:
  """The L2 bound of a ``clipping.BoundedSum`` (or a number, as is).

  >>> l2_sensitivity(clipping.clipped_grad(lambda w, x: w * x, 0.5))
  0.5
  """
  if isinstance(sensitivity, clipping.BoundedSum):
    return sensitivity.l2_sensitivity
  if callable(sensitivity):
    raise TypeError("the sum function states no sensitivity: wrap it in "
                    "clipping.BoundedSum(fn, l2_sensitivity, unit)")
  return float(sensitivity)


def add_noise(sensitivity: Sensitivity, noise_multiplier: float,
              expected_batch_size: float, seed: Seed = None,
              initial_count: int = 0) -> optax.GradientTransformation:
  """Noise + average for a clipped SUM, as an optax transformation.

  Formal guarantees: as ``privatize`` with C = the sensitivity, and key
  ``fold_in(rng_key, count)`` where ``rng_key`` lives in the state and
  ``count`` is ``initial_count`` plus the number of previous updates, so no
  key is reused across steps. Pass the sum function itself
  (``clipping.clipped_grad(...)`` or ``user_level.clipped_delta_sum(...)``,
  a ``BoundedSum``): the noise then reads the bound the sum was clipped to
  and cannot be calibrated to another (a number is taken as the bound). With
  ``seed=None`` (the default) every ``init`` call draws a fresh secret root
  key from OS entropy (call ``init`` outside ``jax.jit``), so
  re-initialising the optimizer state never replays earlier noise. An int
  seed is public and reproducible: anyone who knows it can subtract the
  noise (tests only). The input MUST be the clipped sum, not a mean.

  >>> tx = add_noise(1.0, 1.0, expected_batch_size=10, seed=0)
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> upd, state = tx.update({"w": jnp.ones(2)}, state)
  >>> int(state.count), upd["w"].shape
  (1, (2,))

  Args:
    sensitivity: the ``BoundedSum`` whose output this transform receives,
      or its L2 bound C (the clip norm of ``clipped_grad``).
    noise_multiplier: sigma; the noise std is sigma * C.
    expected_batch_size: q * N (public); the sum is divided by it.
    seed: None (secret OS entropy, the default), an int (public,
      reproducible), or a PRNG key.
    initial_count: the count of the first update (the training loop passes
      its global step, so keys never repeat across phases of one run).

  Returns:
    ``optax.GradientTransformation`` with state ``AddNoiseState``.
  """
  l2_bound = l2_sensitivity(sensitivity)

  def init_fn(params):
    del params
    return init_state(seed, initial_count)

  def update_fn(updates, state, params=None):
    del params
    noisy = privatize(updates, _step_key(state), l2_bound,
                      noise_multiplier, expected_batch_size)
    return noisy, state._replace(count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def dp_aggregate(
    l2_clip_norm: float,
    noise_multiplier: float,
    seed: Seed = None,
    expected_batch_size: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
  """Clip per-example grads, sum, add noise, divide: one optax transform.

  Formal guarantees: each example's gradient is clipped to L2 norm C, the
  clipped gradients are summed and ``privatize``d with key
  ``fold_in(rng_key, count)`` (keys as in ``add_noise``). A per-example
  gradient that is not finite contributes zero. The sum is divided by
  ``expected_batch_size`` (default: the leading batch dimension, which is only
  right for fixed-size batches; pass q * N for Poisson batches). An optional
  ``mask`` keyword ([B], 1 real / 0 padding) zeroes padded rows exactly.

  >>> tx = dp_aggregate(1.0, 0.0, seed=0, expected_batch_size=4)
  >>> state = tx.init({"w": jnp.zeros(2)})
  >>> upd, _ = tx.update({"w": jnp.array([[3., 4.], [0., 1.]])}, state)
  >>> [round(v, 4) for v in upd["w"].tolist()]
  [0.15, 0.45]

  Args:
    l2_clip_norm: clip norm C.
    noise_multiplier: sigma.
    seed: None (secret OS entropy, the default), an int (public), or a key.
    expected_batch_size: q * N; defaults to the leading dim of the updates.

  Returns:
    ``optax.GradientTransformationExtraArgs`` consuming per-example grads
    (leaves ``[B, *param.shape]``), producing a noisy mean like ``params``.
  """

  def init_fn(params):
    del params
    return init_state(seed)

  def update_fn(updates, state, params=None, *, mask=None, **extra_args):
    del params, extra_args
    batch = jax.tree_util.tree_leaves(updates)[0].shape[0]
    if mask is None:
      mask = jnp.ones((batch,), jnp.float32)
    # clip_pytree per row, then a sum, as one contraction (rows.py):
    # factor min(1, C/norm) for real finite rows, 0 otherwise; non-finite
    # rows are zeroed before it, so they add exactly zero.
    norms = jax.vmap(clipping.global_norm)(updates)
    finite = jnp.isfinite(norms)
    factor = jnp.where((mask > 0) & finite,
                       rows.clip_factor(norms, l2_clip_norm), 0.0)
    summed = rows.weighted_row_sum(updates, factor, finite)
    denom = batch if expected_batch_size is None else expected_batch_size
    noisy = privatize(summed, _step_key(state), l2_clip_norm,
                      noise_multiplier, denom)
    return noisy, state._replace(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
