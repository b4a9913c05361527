"""Full fine-tuning on a downstream task (non-private, public data).

The downstream protocol of Bu et al. 2024 (Table 4, standard fine-tuning):
a fresh linear head on the pooled features, trained JOINTLY with the whole
backbone with AdamW on softmax cross-entropy, then test top-1. The data is
public downstream data, so training here is NOT private and spends no
privacy. The params passed to `run` are never changed: training works on its
own copy (jax arrays are immutable) and the tuned params are discarded.

Usage:
  ft = FineTune(feature_fn, x_tr, y_tr, x_te, y_te, steps=2000,
                batch_size=256, learning_rate=1e-4, weight_decay=0.05)
  ft.run(params)  # {"fine_tune/acc": ..., "fine_tune/train_acc": ...}
"""

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.evaluate import linear_probe

FeatureFn = Callable[[Any, jax.Array], jax.Array]


def _logits(state: tuple[Any, dict[str, jax.Array]],
            feature_fn: FeatureFn, images: jax.Array) -> jax.Array:
  """(backbone, head), images [B, H, W, C] -> float32 logits [B, K]."""
  backbone, head = state
  feats = feature_fn(backbone, images).astype(jnp.float32)
  return feats.reshape(feats.shape[0], -1) @ head["w"] + head["b"]


def _batches(n: int, batch_size: int, steps: int,
             seed: int) -> Iterator[np.ndarray]:
  """`steps` index batches [batch_size]: shuffled epochs, no repeats within
  an epoch (the last partial batch of each epoch is dropped)."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  for i in range(steps):
    if i % per_epoch == 0:
      order = rng.permutation(n)
    j = i % per_epoch
    yield order[j * batch_size:(j + 1) * batch_size]


class FineTune:
  """Test accuracy after fine-tuning backbone + a new linear head."""

  def __init__(self, feature_fn: FeatureFn, train_images: np.ndarray,
               train_labels: np.ndarray, test_images: np.ndarray,
               test_labels: np.ndarray, *, steps: int, batch_size: int,
               learning_rate: float, weight_decay: float = 0.0,
               warmup_steps: int | None = None, head_only_steps: int = 0,
               head_learning_rate: float | None = None, seed: int = 0,
               eval_batch_size: int = 256, prefix: str = "fine_tune"):
    """Initialises the evaluator.

    Args:
      feature_fn: (params, images[B, H, W, C]) -> [B, D] features,
        differentiable in params.
      train_images: [N, H, W, C] downstream training images.
      train_labels: int[N] labels.
      test_images: [M, H, W, C] held-out images.
      test_labels: int[M] labels; K = max label (train and test) + 1.
      steps: optimizer steps (>= 1).
      batch_size: examples per step (clipped to N).
      learning_rate: AdamW peak lr (linear warm-up, then cosine to 0).
      weight_decay: AdamW decoupled weight decay, on >= 2-d params only.
      warmup_steps: linear warm-up steps of the backbone after the
        head-only steps; None = 5% of the remaining steps.
      head_only_steps: first steps that train only the head (LP-FT, Kumar
        et al. 2022: a random head's gradients would otherwise scramble the
        pretrained features before it is useful).
      head_learning_rate: constant AdamW lr of the head; None = 10x
        learning_rate.
      seed: seed of the data order.
      eval_batch_size: images per jitted call when measuring accuracy.
      prefix: metric name prefix.
    """
    if steps < 1:
      raise ValueError(f"FineTune: steps={steps} must be >= 1.")
    self.train_images, self.test_images = train_images, test_images
    self.train_labels = np.asarray(train_labels).astype(np.int32)
    self.test_labels = np.asarray(test_labels).astype(np.int32)
    self.num_classes = int(max(self.train_labels.max(),
                               self.test_labels.max())) + 1
    self.steps, self.seed, self.prefix = steps, seed, prefix
    self.batch_size = max(1, min(batch_size, len(self.train_labels)))
    self.eval_batch_size = eval_batch_size
    if not 0 <= head_only_steps < steps:
      raise ValueError(f"FineTune: head_only_steps={head_only_steps} must be "
                       f"in [0, steps={steps}).")
    tuned = steps - head_only_steps
    warmup = tuned // 20 if warmup_steps is None else warmup_steps
    backbone_lr = optax.join_schedules(
        [optax.constant_schedule(0.0), optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, min(warmup, tuned - 1), tuned)],
        [head_only_steps])
    head_lr = (10 * learning_rate if head_learning_rate is None
               else head_learning_rate)
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)
    # state = (backbone, head): one AdamW each.
    self.tx = optax.multi_transform(
        {"backbone": optax.adamw(backbone_lr, weight_decay=weight_decay,
                                 mask=decay_mask),
         "head": optax.adamw(head_lr, weight_decay=weight_decay,
                             mask=decay_mask)},
        lambda state: (jax.tree.map(lambda _: "backbone", state[0]),
                       jax.tree.map(lambda _: "head", state[1])))
    self.feature_fn = feature_fn
    self.logits_fn = lambda state, x: _logits(state, feature_fn, x)

    def loss(state, images, labels):
      return optax.softmax_cross_entropy_with_integer_labels(
          self.logits_fn(state, images), labels).mean()

    def update(state, opt_state, images, labels):
      value, grads = jax.value_and_grad(loss)(state, images, labels)
      updates, opt_state = self.tx.update(grads, opt_state, state)
      return optax.apply_updates(state, updates), opt_state, value

    # Built once, so repeated run() calls (e.g. per checkpoint) reuse it.
    self._update = jax.jit(update)

  def accuracy(self, state: Any, images: np.ndarray,
               labels: np.ndarray) -> float:
    """Top-1 accuracy of (backbone, head) on images [N, H, W, C]."""
    logits = linear_probe.batched_apply(self.logits_fn, state, images,
                                        self.eval_batch_size)
    return float(np.mean(np.argmax(logits, axis=1) == labels))

  def fine_tune(self, params: Any) -> tuple[Any, dict[str, jax.Array]]:
    """Returns the tuned (backbone params, head {"w": [D, K], "b": [K]})."""
    feats = jax.eval_shape(self.feature_fn, params, jax.ShapeDtypeStruct(
        (1,) + self.train_images.shape[1:], self.train_images.dtype))
    d = int(np.prod(feats.shape[1:]))
    head = {"w": jnp.zeros((d, self.num_classes), jnp.float32),
            "b": jnp.zeros((self.num_classes,), jnp.float32)}
    state = (params, head)
    opt_state = self.tx.init(state)
    for idx in _batches(len(self.train_labels), self.batch_size, self.steps,
                        self.seed):
      state, opt_state, _ = self._update(
          state, opt_state, jnp.asarray(self.train_images[idx]),
          jnp.asarray(self.train_labels[idx]))
    return state

  def run(self, params: Any) -> dict[str, float]:
    """Fine-tunes a copy of `params`; returns {prefix/acc (test top-1),
    prefix/train_acc (top-1 on the whole train set after tuning)}."""
    state = self.fine_tune(params)
    return {
        f"{self.prefix}/acc": self.accuracy(state, self.test_images,
                                            self.test_labels),
        f"{self.prefix}/train_acc": self.accuracy(state, self.train_images,
                                                  self.train_labels)}
