"""Parameter EMA (Polyak averaging) as the last optax transform of a phase.

The average reads only the parameters each step produced: post-processing
of the (DP) parameter sequence, so it costs no privacy. It lives in the
optimizer state, so it is placed like the params, checkpointed and resumed
bit for bit with them, and restarts at each phase's first parameters.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
  """count: int32 updates so far in this phase; ema: float32 like params."""
  count: jax.Array
  ema: Any


def decay_at(decay: float, count: jax.Array, warmup: bool) -> jax.Array:
  """The decay of update `count` (0-based): `decay`, or with `warmup`
  min(decay, (1 + count) / (10 + count)), so early parameters, far from the
  later ones, fade fast (tf.train.ExponentialMovingAverage's num_updates)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  count = jnp.asarray(count, jnp.float32)
  return jnp.minimum(decay, (1.0 + count) / (10.0 + count))


def params_ema(decay: float, warmup: bool = True
               ) -> optax.GradientTransformation:
  """Keeps ema <- d ema + (1 - d) (params + updates); updates unchanged.

  Chain it LAST (after the optimizer), so params + updates are the step's
  new parameters. The average starts at the parameters `init` receives.
  """
  if not 0.0 < decay < 1.0:
    raise ValueError(f"config.train.ema_decay={decay} is invalid: use a "
                     "value in (0, 1) (e.g. 0.999), or 0 for no EMA")

  def init(params):
    return EmaState(jnp.zeros([], jnp.int32),
                    jax.tree.map(lambda p: jnp.array(p, jnp.float32), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the params (optimizer.update(g, "
                       "state, params))")
    d = decay_at(decay, state.count, warmup)
    ema = jax.tree.map(
        lambda e, p, u: d * e + (1.0 - d) * (p + u).astype(jnp.float32),
        state.ema, params, updates)
    return updates, EmaState(state.count + 1, ema)

  return optax.GradientTransformation(init, update)


def ema_of(opt_state) -> Any | None:
  """The average in a `phase_optimizer` state (None: no EMA kept)."""
  state = opt_state.get("ema")
  return None if state is None else state.ema
