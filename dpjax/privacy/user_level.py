"""User-level DP: clipped sums of local-training deltas (DP-FedAvg style).

The privacy unit is a USER (all of their examples). Each sampled "unit" (one
user, or a virtual client that groups k users) runs local training from the
current shared params; its update is delta = theta_start - theta_end over the
SHARED params only (partially local variables, e.g. a client-local head, are
initialised inside the unit's computation, trained and dropped: they are
never returned, summed or noised). Each unit's delta is clipped to an L2 norm
and the clipped deltas are summed; ``noise.privatize`` then adds ONE Gaussian
draw and divides by the expected number of users, exactly as for DP-SGD.

Sensitivity (add/remove one user):
  * one user per unit: adding or removing the user adds or removes one
    clipped delta, so the sum moves by at most the unit clip norm.
  * k > 1 users per unit: removing one user changes its unit's data, so that
    unit's clipped delta can move from one point of the clip ball to another:
    up to TWICE the unit clip norm. ``unit_clip_norm`` therefore clips mixed
    units to C/2, so that the per-user sensitivity is C in both cases and the
    Gaussian noise sigma*C of the DP step is calibrated to it (equivalently:
    noise calibrated for sensitivity 2C' with unit clip norm C' = C/2).

  Adding or removing one user must change only its own unit: each user's
  inclusion and unit must depend on that user alone (e.g. a secret keyed
  hash of (key, round, user id) into a number of units fixed by public
  config). A random permutation or partition of all N user ids does NOT
  qualify: changing N redraws every group.

Vectorised: ``jax.vmap`` over units, ``jax.lax.scan`` over local batches; a
batch of units sharded over a mesh is reduced by the sum. Only aggregates
leave these functions (sums and counts), never a unit's delta or loss.
Depends only on jax, numpy and optax.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dpjax.privacy import clipping
from dpjax.privacy import rows

PyTree = Any
# loss_fn(shared, local, example) -> scalar, for ONE example.
LocalLossFn = Callable[[PyTree, PyTree, PyTree], jax.Array]
# local_train(shared, unit) -> (new shared params, mean local loss).
LocalTrainFn = Callable[[PyTree, PyTree], tuple[PyTree, jax.Array]]


def unit_clip_norm(l2_clip_norm: float, users_per_unit: int) -> float:
  """Clip norm of one unit's delta for per-USER sensitivity ``l2_clip_norm``.

  Formal guarantee: with units of one user clipped to C, or units of
  k >= 2 users (grouped independently of other users' data) clipped to C/2,
  adding or removing all data of one user moves the sum of clipped unit
  deltas by at most C in L2 norm.

  Args:
    l2_clip_norm: C, the per-user sensitivity the DP step's noise assumes.
    users_per_unit: k, users whose data one unit trains on jointly.

  Returns:
    C if k == 1 else C / 2.
  """
  if users_per_unit < 1:
    raise ValueError(f"users_per_unit must be >= 1, got {users_per_unit}")
  return float(l2_clip_norm) if users_per_unit == 1 else l2_clip_norm / 2.0


def _zero_padding(example: PyTree, mask: jax.Array) -> PyTree:
  """The unit's examples with every padding row (mask 0) set to zeros.

  Done BEFORE any product: a padding row multiplied by a 0 mask, or
  selected away with `where` after the loss, still sends 0 * NaN = NaN
  into the gradient when it holds NaN/inf. A zeroed row does not, so
  whatever a padding row holds cannot reach the unit's delta (for a loss
  that is finite on a zero input)."""
  real = mask > 0
  return jax.tree.map(
      lambda x: jnp.where(real.reshape(real.shape + (1,) * (x.ndim - 1)),
                          x, jnp.zeros((), x.dtype)), example)


def _local_order(rng: jax.Array, mask: jax.Array, n_batches: int,
                 batch_size: int) -> tuple[jax.Array, jax.Array]:
  """A random order of the real examples, padded: (idx, valid) [n, b]."""
  e = mask.shape[0]
  u = jax.random.uniform(rng, (e,))
  order = jnp.argsort(jnp.where(mask > 0, u, 2.0 + u))  # Real ones first.
  pad = n_batches * batch_size - e
  idx = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
  valid = jnp.concatenate([mask[order] > 0, jnp.zeros((pad,), bool)])
  return (idx.reshape(n_batches, batch_size),
          valid.reshape(n_batches, batch_size))


def local_training(loss_fn: LocalLossFn,
                   init_local: Callable[[jax.Array], PyTree], *,
                   shared_optimizer: optax.GradientTransformation,
                   local_optimizer: optax.GradientTransformation,
                   batch_size: int, epochs: int = 1,
                   reconst_steps: int = 0,
                   init_from_data: bool = False) -> LocalTrainFn:
  """Local training of shared + fresh local params on one unit's data.

  Each epoch shuffles the unit's real examples (padding last) and scans over
  local batches of ``batch_size``; each batch takes one step of both
  optimizers on the batch-mean loss over real examples (a batch with no real
  example changes nothing, optimizer state included). Padding rows (mask 0)
  are zeroed before anything reads them (``init_local`` included), so a
  NaN/inf padding row changes nothing: the delta is exactly that with a
  zero padding row. The first
  ``reconst_steps`` local steps with data train the fresh local params only
  (the shared params stay fixed: "reconstruction" of the local head).

  Args:
    loss_fn: ``loss_fn(shared, local, example) -> scalar`` on ONE example.
    init_local: ``rng -> local params`` (e.g. a Glorot head), called once per
      unit computation; the local params never leave it. With
      ``init_from_data``: ``(rng, shared, example [E, ...], mask [E]) ->
      local params`` (e.g. a head imprinted from the unit's own data).
    shared_optimizer: client optimizer of the shared params.
    local_optimizer: client optimizer of the local params.
    batch_size: local batch size b.
    epochs: passes over the unit's data.
    reconst_steps: leading local steps that update only the local params.
    init_from_data: call ``init_local`` with the unit's data (see above).

  Returns:
    ``local_train(shared, unit) -> (shared_end, mean_loss)`` where ``unit``
    is ``{"example": pytree [E, ...], "mask": [E], "rng": uint32[2]}``;
    ``mean_loss`` is the mean over local steps with data (0 if none).
  """

  def batch_loss(params, examples, valid):
    shared, local = params
    losses = jax.vmap(loss_fn, in_axes=(None, None, 0))(shared, local,
                                                        examples)
    losses = jnp.where(valid, losses, 0.0)
    return jnp.sum(losses) / jnp.maximum(jnp.sum(valid), 1.0)

  grad_fn = jax.value_and_grad(batch_loss)

  def local_train(shared, unit):
    mask = unit["mask"]
    data = _zero_padding(unit["example"], mask)
    e = mask.shape[0]
    n_batches = -(-e // batch_size)
    init_key, order_key = jax.random.split(unit["rng"])
    local = (init_local(init_key, shared, data, mask)
             if init_from_data else init_local(init_key))
    params = (shared, local)
    opt_state = (shared_optimizer.init(shared), local_optimizer.init(local))

    def step(carry, batch):
      params, opt_state, loss_sum, steps = carry
      idx, valid = batch
      examples = jax.tree.map(lambda x: x[idx], data)
      loss, (g_shared, g_local) = grad_fn(params, examples, valid)
      u_shared, s_shared = shared_optimizer.update(
          g_shared, opt_state[0], params[0])
      u_local, s_local = local_optimizer.update(g_local, opt_state[1],
                                                params[1])
      train_shared = steps >= reconst_steps
      u_shared = jax.tree.map(lambda u: jnp.where(train_shared, u, 0.0),
                              u_shared)
      s_shared = jax.tree.map(lambda n, o: jnp.where(train_shared, n, o),
                              s_shared, opt_state[0])
      new = ((optax.apply_updates(params[0], u_shared),
              optax.apply_updates(params[1], u_local)), (s_shared, s_local))
      has_data = jnp.any(valid)
      params, opt_state = jax.tree.map(
          lambda n, o: jnp.where(has_data, n, o), new, (params, opt_state))
      return (params, opt_state, loss_sum + jnp.where(has_data, loss, 0.0),
              steps + has_data.astype(jnp.float32)), None

    carry = (params, opt_state, jnp.zeros((), jnp.float32),
             jnp.zeros((), jnp.float32))
    for epoch_key in jax.random.split(order_key, epochs):
      order = _local_order(epoch_key, mask, n_batches, batch_size)
      carry, _ = jax.lax.scan(step, carry, order)
    (shared_end, _), _, loss_sum, steps = carry
    return shared_end, loss_sum / jnp.maximum(steps, 1.0)

  return local_train


def clipped_delta_sum(local_train: LocalTrainFn,
                      l2_clip_norm: float | None, *,
                      users_per_unit: int = 1,
                      unit_batch: int = 0) -> Callable[..., Any]:
  """Sum over units of clipped shared-param deltas of local training.

  Formal guarantee: each real unit contributes clip(theta - theta_u) with
  L2 norm <= ``unit_clip_norm(l2_clip_norm, users_per_unit)``, so adding or
  removing one user moves the sum by at most ``l2_clip_norm`` (the returned
  ``BoundedSum``'s sensitivity, unit "user"; see ``unit_clip_norm`` for the
  grouping it assumes); padding units (mask 0) contribute exactly
  zero and their data cannot influence the output. A real unit whose delta
  is non-finite (a NaN/inf coordinate, detected by a NaN/inf delta norm; a
  norm overflowing float32 counts too) contributes exactly zero (selected
  away with ``where``, also when ``l2_clip_norm`` is None), so the
  sensitivity bound holds and its presence cannot be read from the sum; it
  is counted in ``aux["num_nonfinite"]``.

  Args:
    local_train: see ``local_training``; ``local_train(shared, unit)``.
    l2_clip_norm: per-USER sensitivity C; None disables clipping
      (NON-private runs: a plain function is returned).
    users_per_unit: k, users one unit trains on jointly (k >= 2: units are
      clipped to C/2).
    unit_batch: 0 vmaps over all units at once; b > 0 runs ``jax.lax.map``
      over groups of b vmapped units (less memory; faster on CPU, where
      batched per-unit convolutions are slow). Same result either way.

  Returns:
    ``fn(shared, units, mask, weights=None) -> (sum, aux)`` (a
    ``clipping.BoundedSum`` when clipping): ``units`` is a
    pytree with a leading unit axis [U, ...], ``mask`` float [U] (1 real, 0
    padding), ``weights`` float [U] (default ``mask``; e.g. users per unit)
    weighting the aux statistics. ``sum`` is like ``shared`` (float32);
    aux = {"loss_sum", "grad_norm_sum", "num_clipped", "count",
    "num_nonfinite"}: weighted sums of local loss (finite ones), delta norm
    (finite ones), clipped indicator (finite units), the weights, and the
    non-finite indicator (units whose delta was NaN/inf).
  """
  sensitivity = l2_clip_norm
  if l2_clip_norm is not None:
    l2_clip_norm = unit_clip_norm(l2_clip_norm, users_per_unit)

  def one(shared, unit):
    end, loss = local_train(shared, unit)
    delta = jax.tree.map(lambda a, b: a.astype(jnp.float32)
                         - b.astype(jnp.float32), shared, end)
    # The norm is NaN/inf iff some coordinate is (or it overflows float32).
    # clip_pytree zeroes such a delta; without clipping, where does.
    if l2_clip_norm is None:
      norm = clipping.global_norm(delta)
    else:
      delta, norm = clipping.clip_pytree(delta, l2_clip_norm)
    finite = jnp.isfinite(norm)
    if l2_clip_norm is None:
      delta = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), delta)
    loss = jnp.asarray(loss, jnp.float32)
    return (delta, jnp.where(finite & jnp.isfinite(loss), loss, 0.0),
            jnp.where(finite, norm, 0.0), finite)

  def fn(shared, units, mask, weights=None):
    if unit_batch:
      deltas, losses, norms, finite = jax.lax.map(
          lambda u: one(shared, u), units, batch_size=unit_batch)
    else:
      deltas, losses, norms, finite = jax.vmap(one, in_axes=(None, 0))(
          shared, units)
    real = mask > 0
    w = jnp.where(real, mask if weights is None else weights, 0.0)
    w = w.astype(jnp.float32)

    clipped = (jnp.zeros_like(norms, bool) if l2_clip_norm is None
               else norms > l2_clip_norm)
    aux = {
        "loss_sum": jnp.sum(w * jnp.where(real, losses, 0.0)),
        "grad_norm_sum": jnp.sum(w * jnp.where(real, norms, 0.0)),
        "num_clipped": jnp.sum(jnp.where(real & finite & clipped, w, 0.0)),
        "count": jnp.sum(w),
        "num_nonfinite": jnp.sum(jnp.where(real & ~finite, w, 0.0)),
    }
    # Every delta is finite here (non-finite ones were zeroed above), so a
    # 0/1 contraction adds padding units as exact zeros.
    total = rows.weighted_row_sum(deltas, jnp.where(real, 1.0, 0.0))
    return total, aux

  if sensitivity is None:
    return fn
  return clipping.BoundedSum(fn, float(sensitivity), "user")
