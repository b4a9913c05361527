"""THE DP step: clipped sum -> one Gaussian draw -> / expected batch -> optimizer.

A logical Poisson batch arrives as a variable number of fixed-shape
microbatches. `accumulate` adds each microbatch's SUM of clipped per-example
gradients (padding rows contribute exactly zero) into an accumulator; `apply`
then adds ONE Gaussian draw N(0, (sigma C)^2) per coordinate with the key
fold_in(noise_key, step), divides by the EXPECTED batch size q*N (never the
realised size, which would leak it) and takes an optimizer step. Nothing
scales the clipped sum before the noise. Under a mesh the accumulator is the
globally reduced sum, so the noise is drawn once, not once per device.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpjax import privacy

# Aggregates over real rows of a microbatch. num_nonfinite: real rows whose
# gradient was NaN/inf (they contribute zero to the clipped sum).
AUX_KEYS = ("loss_sum", "grad_norm_sum", "num_clipped", "count",
            "num_nonfinite")


class TrainState(NamedTuple):
  """Everything the step changes; checkpointed as one pytree.

  step: int32 global step (over all phases); keys derive from it.
  noise_key: uint32[2] secret root of the DP noise (never logged).
  sampling_key: uint32[2] secret root of Poisson batch selection and
    per-example randomness on private data (read on the host by the loop;
    never logged). Both keys are in the resumable checkpoint only.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  noise_key: jax.Array
  sampling_key: jax.Array


def zeros_accumulator(params) -> dict:
  """Accumulator: f32 gradient sum like params + aggregate scalars."""
  acc = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
  acc["grad"] = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return acc


def private_sum_fn(loss_fn, l2_clip_norm: float, *, clipping: str = "clip",
                   normalize_gamma: float = 0.01, inner_microbatch: int = 0,
                   method: str = "vmap"):
  """Per-example clipped-gradient sum of `loss_fn` (privacy.clipped_grad)."""
  kwargs = dict(clipping=clipping, normalize_gamma=normalize_gamma,
                microbatch_size=inner_microbatch or None)
  if method != "vmap":
    kwargs["method"] = method
  return privacy.clipped_grad(loss_fn, l2_clip_norm, **kwargs)


def nonprivate_sum_fn(loss_fn):
  """Plain (unclipped) gradient sum over real rows, one batched backward."""
  def fn(params, batch, mask):
    def total(p):
      losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
      losses = jnp.where(mask > 0, losses, 0.0)
      return jnp.sum(losses), losses
    grads, losses = jax.grad(total, has_aux=True)(params)
    zero = jnp.zeros((), jnp.float32)
    return grads, dict(loss_sum=jnp.sum(losses), grad_norm_sum=zero,
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


def apply(state: TrainState, acc: dict, *, optimizer: optax.GradientTransformation,
          private: bool, l2_clip_norm: float, noise_multiplier: float,
          expected_batch_size: float) -> tuple[TrainState, dict]:
  """Privatises the accumulated sum once and takes one optimizer step.

  Formal guarantee (private=True): with Poisson sampling at rate q and every
  unit's contribution to acc["grad"] bounded by l2_clip_norm, the update is
  the subsampled Gaussian mechanism with noise multiplier sigma; its privacy
  is what the ledger accounts. Non-private phases divide the plain sum by the
  realised count (public data: nothing to hide).

  Returns:
    The new state and aggregate metrics (computed on the data of the phase:
    for private phases they are NOT differentially private).
  """
  if private:
    key = jax.random.fold_in(state.noise_key, state.step)
    grad = privacy.privatize(acc["grad"], key, l2_clip_norm,
                             noise_multiplier, expected_batch_size)
  else:
    denom = jnp.maximum(acc["count"], 1.0)
    grad = jax.tree.map(lambda g: g / denom, acc["grad"])
  grad = jax.tree.map(lambda g, p: g.astype(p.dtype), grad, state.params)
  updates, opt_state = optimizer.update(grad, state.opt_state, state.params)
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
