"""THE DP step: clipped sum -> one Gaussian draw -> / expected batch -> optimizer.

A logical Poisson batch arrives as a variable number of fixed-shape
microbatches. `accumulate` adds each microbatch's SUM of clipped per-example
gradients (padding rows contribute exactly zero) into an accumulator; `apply`
then runs `optimizer.update` of `phase_optimizer(...)` =
`optax.chain(privacy.add_noise(sum_fn, sigma, q*N, key), optimizer)`: ONE
Gaussian draw N(0, (sigma C)^2) per coordinate, C read from the sum
function (`privacy.clipping.BoundedSum`), key fold_in(root, global step)
with the secret root in the optimizer state; division by the EXPECTED batch
size q*N (never the realised size, which would leak it); then the
optimizer. This is the library recipe of `dpjax.privacy` verbatim. Nothing
scales the clipped sum before the noise. Under a mesh the accumulator is the
globally reduced sum, so the noise is drawn once, not once per device.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import privacy
from dpjax.privacy import redact
from dpjax.train import ema as ema_lib

# Aggregates over real rows of a microbatch. num_nonfinite: real rows whose
# gradient was NaN/inf (they contribute zero to the clipped sum).
AUX_KEYS = ("loss_sum", "grad_norm_sum", "num_clipped", "count",
            "num_nonfinite")


class TrainState(NamedTuple):
  """Everything the step changes; checkpointed as one pytree.

  step: int32 global step (over all phases).
  opt_state: the state of `phase_optimizer`, by name: {"noise": head,
    "optimizer": ..., ["ema": ...]}; the head of a private phase holds
    the count and `rng_key`, the secret root of the DP noise (never
    logged).
  sampling_key: uint32[2] secret root of Poisson batch selection and
    per-example randomness on private data (read on the host by the loop;
    never logged). Both keys are in the resumable checkpoint only.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  sampling_key: jax.Array
  # Never print the sampling key (the noise key's state hides its own).
  __repr__ = redact.namedtuple_repr("sampling_key")


def zeros_accumulator(params) -> dict:
  """Accumulator: f32 gradient sum like params + aggregate scalars."""
  acc = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
  acc["grad"] = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return acc


def private_sum_fn(loss_fn, l2_clip_norm: float, *, clipping: str = "clip",
                   normalize_gamma: float = 0.01, inner_microbatch: int = 0,
                   method: str = "auto") -> privacy.clipping.BoundedSum:
  """Per-example clipped-gradient sum of `loss_fn` (privacy.clipped_grad)."""
  return privacy.clipped_grad(
      loss_fn, l2_clip_norm, clipping=clipping,
      normalize_gamma=normalize_gamma,
      microbatch_size=inner_microbatch or None, method=method)


def phase_sum_fn(phase, settings, inner_microbatch: int = 0):
  """The sum function the loop (and `dpjax.plan`) runs for `phase`: its
  own `clipped_sum_fn`, the per-example clipped sum of private phases, or
  the plain gradient sum of public ones."""
  if phase.clipped_sum_fn is not None:
    return phase.clipped_sum_fn
  if not phase.private:
    return nonprivate_sum_fn(phase.loss_fn, inner_microbatch)
  return private_sum_fn(
      phase.loss_fn, settings.l2_clip_norm, clipping=settings.clipping,
      normalize_gamma=settings.normalize_gamma,
      inner_microbatch=inner_microbatch, method=settings.method)


def mean_of_sum() -> optax.GradientTransformationExtraArgs:
  """Head of a NON-private phase: the plain gradient sum / realised count
  (`count=` extra argument; public data, nothing to hide)."""

  def update_fn(updates, state, params=None, *, count=1.0, **extra_args):
    del params, extra_args
    denom = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g / denom, updates), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def phase_optimizer(optimizer: optax.GradientTransformation, *,
                    noise: optax.GradientTransformation | None = None,
                    ema_decay: float = 0.0, ema_warmup: bool = True
                    ) -> optax.GradientTransformation:
  """`named_chain(noise=head, optimizer=optimizer[, ema=...])` of one
  phase; its state, `TrainState.opt_state`, is the dict of their states
  by those names (read by name: `inner_opt_state`, `ema.ema_of`).

  Private phases: head = `noise`, the phase mechanism's noise transform
  (`privacy.mechanisms.Mechanism.noise`, e.g. `privacy.add_noise(sum_fn,
  sigma, q*N, seed=noise_key, initial_count=first_step)`: step t's key is
  fold_in(noise_key, t) for the global step t). Public phases (`noise`
  None): head = `mean_of_sum()`. `ema_decay` > 0 appends
  `train.ema.params_ema` (an average of the new params; post-processing,
  no privacy cost).
  """
  parts = [("noise", mean_of_sum() if noise is None else noise),
           ("optimizer", optimizer)]
  if ema_decay:
    parts.append(("ema", ema_lib.params_ema(ema_decay, ema_warmup)))
  return optax.named_chain(*parts)


def inner_opt_state(opt_state):
  """The wrapped optimizer's part of a `phase_optimizer` state."""
  return opt_state["optimizer"]


def nonprivate_sum_fn(loss_fn, inner_microbatch: int = 0):
  """Plain (unclipped) gradient sum over real rows, one batched backward
  (`inner_microbatch` > 0: a lax.scan over chunks of that many rows, for
  memory, as in the private sum)."""
  def chunk(params, batch, mask):
    def total(p):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
      losses = jnp.where(mask > 0, losses, 0.0)
      return jnp.sum(losses), losses
    grads, losses = jax.grad(total, has_aux=True)(params)
    return grads, jnp.sum(losses)

  def fn(params, batch, mask):
    n = mask.shape[0]
    if inner_microbatch and n > inner_microbatch:
      if n % inner_microbatch:
        raise ValueError(f"inner_microbatch={inner_microbatch} does not "
                         f"divide the microbatch of {n} rows")
      split = lambda x: x.reshape(n // inner_microbatch, inner_microbatch,
                                  *x.shape[1:])
      def body(carry, xs):
        g, l = chunk(params, *xs)
        return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry,
                            (g, l)), None
      init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
              jnp.zeros((), jnp.float32))
      (grads, loss_sum), _ = jax.lax.scan(
          body, init, (jax.tree.map(split, batch), split(mask)))
    else:
      grads, loss_sum = chunk(params, batch, mask)
    zero = jnp.zeros((), jnp.float32)
    return grads, dict(loss_sum=loss_sum, grad_norm_sum=zero,
                       num_clipped=zero, num_nonfinite=zero,
                       count=jnp.sum(mask > 0, dtype=jnp.float32))
  return fn


def accumulate(sum_fn, params, acc: dict, batch, mask) -> dict:
  """acc + sum_fn(params, microbatch, mask); jit with acc donated."""
  grad_sum, aux = sum_fn(params, batch, mask)
  new = {k: acc[k] + jnp.asarray(aux[k], jnp.float32) for k in AUX_KEYS}
  new["grad"] = jax.tree.map(
      lambda a, g: a + g.astype(jnp.float32), acc["grad"], grad_sum)
  return new


def apply(state: TrainState, acc: dict, *,
          optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One `optimizer.update` (a `phase_optimizer`) of the accumulated sum.

  Formal guarantee (private phases): with Poisson sampling at rate q and
  every unit's contribution to acc["grad"] bounded by the sum function's
  sensitivity C, the update is the subsampled Gaussian mechanism with noise
  multiplier sigma; its privacy is what the ledger accounts.

  Returns:
    The new state and aggregate metrics (computed on the data of the phase:
    for private phases they are NOT differentially private).
  """
  updates, opt_state = optimizer.update(acc["grad"], state.opt_state,
                                        state.params, count=acc["count"])
  params = optax.apply_updates(state.params, updates)
  count = jnp.maximum(acc["count"], 1.0)
  metrics = dict(
      loss=acc["loss_sum"] / count,
      grad_norm=acc["grad_norm_sum"] / count,
      clipped_fraction=acc["num_clipped"] / count,
      # A count (not a fraction): rows dropped for a NaN/inf gradient.
      nonfinite_rows=acc["num_nonfinite"],
      update_norm=optax.tree.norm(updates),
  )
  return state._replace(step=state.step + 1, params=params,
                        opt_state=opt_state), metrics
