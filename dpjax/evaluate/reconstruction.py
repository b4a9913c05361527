"""Held-out masked-autoencoder loss with fixed per-image masks (ViP)."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dpjax.evaluate import linear_probe


class HeldOutMAELoss:
  """Mean masked-patch MSE on held-out images, the same masks every run."""

  def __init__(self, loss_fn: Callable[[Any, jax.Array, jax.Array],
                                       jax.Array],
               images: np.ndarray, keys: np.ndarray, batch_size: int = 256,
               prefix: str = "mae"):
    """Initialises the evaluator.

    Args:
      loss_fn: (params, images[B, S, S, 3], keys uint32[B, 2]) -> [B]
        per-image loss; each image's mask is drawn from its own key.
      images: float32[N, S, S, 3] in [-1, 1].
      keys: uint32[N, 2] fixed mask keys.
      batch_size: images per loss_fn call.
      prefix: metric name prefix.
    """
    self.loss_fn, self.images, self.keys = loss_fn, images, keys
    self.batch_size, self.prefix = batch_size, prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/heldout_loss}."""
    losses = linear_probe.batched_apply(
        self.loss_fn, params, (self.images, self.keys), self.batch_size)
    return {f"{self.prefix}/heldout_loss": float(np.mean(losses))}
