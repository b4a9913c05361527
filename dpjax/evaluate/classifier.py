"""Accuracy of a trained classifier head on held-out labelled images."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.evaluate import linear_probe


class ClassifierAccuracy:
  """Top-1 / top-5 accuracy and mean cross-entropy of the model's logits."""

  def __init__(self, logits_fn: Callable[[Any, jax.Array], jax.Array],
               images: np.ndarray, labels: np.ndarray,
               batch_size: int = 256, prefix: str = "classifier"):
    """Initialises the evaluator.

    Args:
      logits_fn: (params, images[B, H, W, C]) -> [B, K] class logits.
      images: [N, H, W, C] held-out images.
      labels: int[N] in [0, K).
      batch_size: images per logits_fn call.
      prefix: metric name prefix.
    """
    self.logits_fn, self.images, self.labels = logits_fn, images, labels
    self.batch_size, self.prefix = batch_size, prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/top1, prefix/top5, prefix/ce}."""
    logits = linear_probe.batched_apply(
        self.logits_fn, params, self.images, self.batch_size)
    y = self.labels.astype(np.int64)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    ce = optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits), jnp.asarray(y))
    return {f"{self.prefix}/top1": float(np.mean(top5[:, 0] == y)),
            f"{self.prefix}/top5": float(np.mean((top5 == y[:, None]).any(1))),
            f"{self.prefix}/ce": float(jnp.mean(ce))}
