"""DP optimizers: ``optax.chain(noise.add_noise(...), optimizer)``.

They consume the clipped SUM from ``clipping.clipped_grad`` (not a mean):
noise is added once and the sum divided by the expected batch size before
the optimizer sees it. Everything after the noise is post-processing, so the
privacy guarantee is that of ``noise.add_noise``.
"""

from typing import Any, Callable, Optional, Union

import optax

from dpjax.privacy import noise

ScalarOrSchedule = Union[float, optax.Schedule]


def dpsgd(learning_rate: ScalarOrSchedule, l2_clip_norm: float,
          noise_multiplier: float, expected_batch_size: float,
          seed: noise.Seed = None, momentum: Optional[float] = None,
          nesterov: bool = False) -> optax.GradientTransformation:
  """DP-SGD (Abadi et al. 2016) on a clipped sum.

  Formal guarantees: as ``noise.add_noise``; with Poisson sampling at rate q
  for T steps it is ``accounting.epsilon(noise_multiplier, q, T, delta)``-DP.

  >>> import jax.numpy as jnp
  >>> tx = dpsgd(0.1, 1.0, 1.0, expected_batch_size=8, seed=0)
  >>> upd, _ = tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.zeros(3)}))
  >>> upd["w"].shape
  (3,)

  Args:
    learning_rate: float or optax schedule.
    l2_clip_norm: clip norm C used for the sum.
    noise_multiplier: sigma.
    expected_batch_size: q * N.
    seed: noise key source (``noise.add_noise``): None = secret OS entropy
      (the default), an int = public and reproducible (tests only).
    momentum: optional heavy-ball momentum.
    nesterov: Nesterov momentum.

  Returns:
    ``optax.GradientTransformation``.
  """
  return optax.chain(
      noise.add_noise(l2_clip_norm, noise_multiplier, expected_batch_size,
                      seed),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def dpadamw(learning_rate: ScalarOrSchedule, l2_clip_norm: float,
            noise_multiplier: float, expected_batch_size: float,
            seed: noise.Seed = None, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
            weight_decay: float = 1e-4,
            mask: Optional[Union[Any, Callable[[Any], Any]]] = None
            ) -> optax.GradientTransformation:
  """DP-AdamW on a clipped sum (b2 = 0.95 as in DP-Cap / ViP).

  Formal guarantees: as ``noise.add_noise``; Adam moments and weight decay
  use only the privatized gradient and the (public) parameters.

  >>> import jax.numpy as jnp
  >>> tx = dpadamw(1e-3, 1.0, 1.0, expected_batch_size=8, seed=0)
  >>> upd, _ = tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.zeros(3)}),
  ...                    {"w": jnp.zeros(3)})
  >>> upd["w"].shape
  (3,)

  Args:
    learning_rate: float or optax schedule.
    l2_clip_norm: clip norm C used for the sum.
    noise_multiplier: sigma.
    expected_batch_size: q * N.
    seed: noise key source (``noise.add_noise``): None = secret OS entropy
      (the default), an int = public and reproducible (tests only).
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    weight_decay: decoupled weight decay.
    mask: optax weight-decay mask (pytree or callable).

  Returns:
    ``optax.GradientTransformation``.
  """
  return optax.chain(
      noise.add_noise(l2_clip_norm, noise_multiplier, expected_batch_size,
                      seed),
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                  weight_decay=weight_decay, mask=mask))
