"""Few-shot linear classification on frozen features (DP-Cap / MSN protocol).

For each k in ``shots`` and each seed, k examples per class are drawn from the
train set (without replacement; all of a class if it has fewer), the drawn
features are centred with their own mean and L2-normalised (the test features
with the same mean), and a multinomial logistic regression is fitted. The
test accuracy is averaged over seeds. The draw depends only on (seed, k, the
train labels), so it is identical across runs and checkpoints.

Usage:
  FewShot(feature_fn, x_tr, y_tr, x_te, y_te, shots=(1, 5, 10)).run(params)
  # {"few_shot/1shot_acc": ..., "few_shot/5shot_acc": ..., ...}
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from dpjax.evaluate import linear_probe


def sample_shots(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Indices of k examples per class, deterministic in (labels, k, seed).

  Args:
    labels: [N] integer labels.
    k: examples per class (all of a class when it has fewer than k).
    seed: sampling seed.

  Returns:
    Sorted int array of selected indices into labels.
  """
  rng = np.random.default_rng([seed, k])
  picked = []
  for c in np.unique(labels):  # Sorted classes: a fixed draw order.
    idx = np.flatnonzero(labels == c)
    picked.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
  return np.sort(np.concatenate(picked))


class FewShot:
  """k-shot logistic-regression accuracy of frozen features."""

  def __init__(self, feature_fn: linear_probe.FeatureFn,
               train_images: np.ndarray, train_labels: np.ndarray,
               test_images: np.ndarray, test_labels: np.ndarray,
               shots: Sequence[int] = (1, 5, 10), seeds: int = 3,
               c: float = 10.0, batch_size: int = 256,
               prefix: str = "few_shot"):
    """Initialises the evaluator.

    Args:
      feature_fn: (params, images[B, H, W, C]) -> [B, D].
      train_images: [N, H, W, C] pool the shots are drawn from.
      train_labels: int[N].
      test_images: [M, H, W, C].
      test_labels: int[M].
      shots: the k values (examples per class).
      seeds: number of draws per k (seeds 0 .. seeds-1), accuracy averaged.
      c: sklearn inverse L2 regularisation (fixed: there is no validation
        data in the few-shot regime).
      batch_size: images per feature_fn call.
      prefix: metric name prefix.
    """
    self.feature_fn = feature_fn
    self.train_images, self.test_images = train_images, test_images
    self.train_labels = np.asarray(train_labels)
    self.test_labels = np.asarray(test_labels)
    self.shots, self.seeds, self.c = tuple(shots), seeds, c
    self.batch_size, self.prefix = batch_size, prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/{k}shot_acc} (mean over seeds) and prefix/chance."""
    f_tr = linear_probe.features(self.feature_fn, params, self.train_images,
                                 self.batch_size)
    f_te = linear_probe.features(self.feature_fn, params, self.test_images,
                                 self.batch_size)
    out = {}
    for k in self.shots:
      accs = []
      for seed in range(self.seeds):
        idx = sample_shots(self.train_labels, k, seed)
        x_tr, x_te = linear_probe.center_normalize(f_tr[idx], f_te)
        accs.append(linear_probe.logreg_accuracy(
            x_tr, self.train_labels[idx], x_te, self.test_labels, self.c))
      out[f"{self.prefix}/{k}shot_acc"] = float(np.mean(accs))
    out[f"{self.prefix}/chance"] = 1.0 / len(np.unique(self.train_labels))
    return out
