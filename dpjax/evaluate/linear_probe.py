"""Linear probe on frozen features (non-private, held-out public data).

Two protocols:

* ``"logreg"`` (DP-Cap / MSN ``logistic_eval``): features are centred with the
  train mean and L2-normalised, then a multinomial logistic regression
  (sklearn, lbfgs) is fitted; its inverse regularisation ``C`` is chosen on a
  deterministic 80/20 split of the train set from ``c_grid`` and the model is
  refitted on the whole train set.
* ``"mae"`` (MAE / ViP ``main_linprobe.py``): ``feature_fn`` already returns
  the pooled features concatenated over the last blocks (and applies the
  encoder's own ``fc_norm``). Each feature is standardised with the train
  mean / variance (BatchNorm1d(affine=False) at its population statistics),
  then a linear head is trained with optax (SGD+momentum, LARS or Adam, cosine
  schedule with warm-up, lr = base_lr * batch / 256, no weight decay).

Usage:
  probe = LinearProbe(feature_fn, x_tr, {"shape": y_tr}, x_te, {"shape": y_te})
  probe.run(params)  # {"linear_probe/shape_acc": ..., ".../shape_chance": ...}
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import linear_model

FeatureFn = Callable[[Any, jax.Array], jax.Array]
Labels = Mapping[str, np.ndarray] | np.ndarray


def batched_apply(fn: Callable[..., jax.Array], params: Any,
                  inputs: np.ndarray | tuple[np.ndarray, ...],
                  batch_size: int) -> np.ndarray:
  """Applies ``fn(params, *rows[B]) -> [B, ...]`` to all rows, under jit.

  The last batch is zero-padded to a full batch so that only one shape is
  compiled; the padded rows are dropped.

  Args:
    fn: jax-traceable function of (params, x[B, ...], ...).
    params: model parameters (any pytree).
    inputs: one [N, ...] array, or a tuple of arrays with the same N that are
      passed as separate arguments (e.g. (images, tokens)).
    batch_size: rows per call (clipped to N).

  Returns:
    [N, ...] numpy array, the concatenated outputs.
  """
  arrays = inputs if isinstance(inputs, tuple) else (inputs,)
  n = len(arrays[0])
  if n == 0 or any(len(a) != n for a in arrays):
    raise ValueError(f"batched_apply: bad input lengths "
                     f"{[len(a) for a in arrays]}.")
  bs = max(1, min(batch_size, n))
  jfn = jax.jit(fn)  # jit caches on `fn`, so repeated calls do not retrace.
  outs = []
  for start in range(0, n, bs):
    chunks = [np.asarray(a[start:start + bs]) for a in arrays]
    real = len(chunks[0])
    if real < bs:
      chunks = [np.concatenate([c, np.zeros((bs - real,) + c.shape[1:],
                                            c.dtype)]) for c in chunks]
    outs.append(np.asarray(jax.device_get(jfn(params, *chunks)))[:real])
  return np.concatenate(outs)


def features(feature_fn: FeatureFn, params: Any, images: np.ndarray,
             batch_size: int = 256) -> np.ndarray:
  """Frozen features of all images.

  Args:
    feature_fn: (params, images[B, H, W, C]) -> [B, D].
    params: model parameters.
    images: [N, H, W, C].
    batch_size: images per jitted call.

  Returns:
    float32 [N, D] numpy array.
  """
  out = batched_apply(feature_fn, params, images, batch_size)
  return out.reshape(len(images), -1).astype(np.float32)


def center_normalize(train: np.ndarray, *others: np.ndarray
                     ) -> tuple[np.ndarray, ...]:
  """Centres with the mean of ``train`` and L2-normalises every row.

  Args:
    train: [N, D] features whose mean is subtracted from all arrays.
    *others: further [M, D] arrays (e.g. test features).

  Returns:
    The transformed (train, *others), same shapes, float64.
  """
  mean = train.astype(np.float64).mean(0, keepdims=True)
  out = []
  for x in (train,) + others:
    x = x.astype(np.float64) - mean
    out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
  return tuple(out)


def majority_accuracy(train_y: np.ndarray, test_y: np.ndarray) -> float:
  """Test accuracy of always predicting the most frequent train label."""
  values, counts = np.unique(train_y, return_counts=True)
  return float(np.mean(test_y == values[np.argmax(counts)]))


def logreg_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray,
                    y_te: np.ndarray, c: float = 1.0,
                    max_iter: int = 1000) -> float:
  """Fits multinomial logistic regression, returns test accuracy.

  Args:
    x_tr: [N, D] train features (already normalised).
    y_tr: [N] integer labels.
    x_te: [M, D] test features.
    y_te: [M] integer labels.
    c: sklearn inverse L2 regularisation strength.
    max_iter: lbfgs iterations.

  Returns:
    Test accuracy in [0, 1]. With a single train class, the constant
    prediction's accuracy.
  """
  if len(np.unique(y_tr)) < 2:
    return majority_accuracy(y_tr, y_te)
  clf = linear_model.LogisticRegression(C=c, max_iter=max_iter)
  clf.fit(x_tr, y_tr)
  return float(np.mean(clf.predict(x_te) == y_te))


def select_c(x: np.ndarray, y: np.ndarray, c_grid: tuple[float, ...],
             val_fraction: float = 0.2, seed: int = 0) -> float:
  """Chooses C on a deterministic train/validation split of (x, y)."""
  if len(c_grid) == 1:
    return float(c_grid[0])
  perm = np.random.default_rng(seed).permutation(len(x))
  n_val = max(1, int(round(val_fraction * len(x))))
  val, tr = perm[:n_val], perm[n_val:]
  accs = [logreg_accuracy(x[tr], y[tr], x[val], y[val], c) for c in c_grid]
  return float(c_grid[int(np.argmax(accs))])  # First best: most regularised.


def train_linear_head(x: np.ndarray, y: np.ndarray, num_classes: int, *,
                      epochs: int = 90, batch_size: int = 256,
                      base_lr: float = 0.1, warmup_epochs: int = 10,
                      optimizer: str = "sgd", seed: int = 0
                      ) -> dict[str, jax.Array]:
  """Trains a softmax linear head with optax (MAE linear-probe recipe).

  Args:
    x: [N, D] standardised features.
    y: [N] integer labels in [0, num_classes).
    num_classes: K.
    epochs: passes over the data (the last partial batch is dropped).
    batch_size: examples per step (clipped to N).
    base_lr: lr = base_lr * batch_size / 256 (MAE's "blr").
    warmup_epochs: linear warm-up, then cosine decay to 0.
    optimizer: "sgd" (momentum 0.9), "lars" (MAE's; trust ratio, coefficient
      1e-3, on the kernel only) or "adam". LARS moves the head by about
      lr * 1e-3 * |w| per step: right at MAE's scale (B=16384, lr=6.4, ~7k
      steps), far too slow for a tiny probe unless base_lr is raised ~1000x.
    seed: seed of the data order.

  Returns:
    {"w": [D, K], "b": [K]}.
  """
  n, d = x.shape
  bs = max(1, min(batch_size, n))
  steps_per_epoch = n // bs
  total = epochs * steps_per_epoch
  lr = base_lr * bs / 256
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, min(warmup_epochs * steps_per_epoch, total - 1), total)
  if optimizer == "sgd":
    tx = optax.sgd(schedule, momentum=0.9)
  elif optimizer == "lars":
    mask = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)
    tx = optax.lars(schedule, weight_decay=0.0, weight_decay_mask=mask,
                    trust_ratio_mask=mask, momentum=0.9)
  elif optimizer == "adam":
    tx = optax.adam(schedule)
  else:
    raise ValueError(f"optimizer={optimizer!r}; use 'sgd', 'lars' or 'adam'.")
  rng = np.random.default_rng(seed)
  order = np.stack([rng.permutation(n)[:steps_per_epoch * bs]
                    for _ in range(epochs)]).reshape(total, bs)
  # MAE initialises the head with trunc_normal(std=0.01); zero bias.
  w0 = 0.01 * jax.random.truncated_normal(
      jax.random.PRNGKey(seed), -2.0, 2.0, (d, num_classes))
  params = {"w": w0, "b": jnp.zeros((num_classes,))}
  return _fit_head(params, tx, jnp.asarray(x, jnp.float32),
                   jnp.asarray(y, jnp.int32), jnp.asarray(order))


def _fit_head(params, tx, x, y, order):
  """Runs all SGD steps in one jitted scan."""

  def loss(p, xb, yb):
    logits = xb @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def fit(params, x, y, order):
    def step(carry, idx):
      p, s = carry
      g = jax.grad(loss)(p, x[idx], y[idx])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), order)
    return p

  return fit(params, x, y, order)


class LinearProbe:
  """Linear-probe accuracy of frozen features, one probe per label set."""

  def __init__(self, feature_fn: FeatureFn, train_images: np.ndarray,
               train_labels: Labels, test_images: np.ndarray,
               test_labels: Labels, batch_size: int = 256,
               protocol: str = "logreg",
               c_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0),
               mae_epochs: int = 90, mae_batch_size: int = 256,
               mae_base_lr: float = 0.1, mae_optimizer: str = "sgd",
               prefix: str = "linear_probe"):
    """Initialises the probe.

    Args:
      feature_fn: (params, images[B, H, W, C]) -> [B, D] frozen features.
      train_images: [N, H, W, C] probe training images.
      train_labels: {name: int[N]} label sets (or one int[N] array, named
        "label").
      test_images: [M, H, W, C] held-out images.
      test_labels: {name: int[M]}, same names as train_labels.
      batch_size: images per feature_fn call.
      protocol: "logreg" (centred + L2-normalised, sklearn logistic regression
        with C chosen on a train split from c_grid) or "mae" (standardised
        features + optax-trained linear head).
      c_grid: candidate C values for "logreg"; one value means no selection.
      mae_epochs: "mae" head training epochs.
      mae_batch_size: "mae" head batch size.
      mae_base_lr: "mae" base lr (lr = base * batch / 256).
      mae_optimizer: "sgd", "lars" or "adam".
      prefix: metric name prefix.
    """
    if protocol not in ("logreg", "mae"):
      raise ValueError(f"protocol={protocol!r}; use 'logreg' or 'mae'.")
    self.feature_fn = feature_fn
    self.train_images, self.test_images = train_images, test_images
    self.train_labels = _as_dict(train_labels)
    self.test_labels = _as_dict(test_labels)
    if set(self.train_labels) != set(self.test_labels):
      raise ValueError(f"train label sets {sorted(self.train_labels)} != "
                       f"test label sets {sorted(self.test_labels)}.")
    self.batch_size, self.protocol, self.c_grid = batch_size, protocol, c_grid
    self.mae_kwargs = dict(epochs=mae_epochs, batch_size=mae_batch_size,
                           base_lr=mae_base_lr, optimizer=mae_optimizer)
    self.prefix = prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/{name}_acc, prefix/{name}_chance} per label set.

    "_chance" is the majority-class baseline: the test accuracy of always
    predicting the most frequent train label.
    """
    f_tr = features(self.feature_fn, params, self.train_images,
                    self.batch_size)
    f_te = features(self.feature_fn, params, self.test_images,
                    self.batch_size)
    if self.protocol == "logreg":
      f_tr, f_te = center_normalize(f_tr, f_te)
    else:
      mean, std = f_tr.mean(0), np.sqrt(f_tr.var(0) + 1e-6)
      f_tr, f_te = (f_tr - mean) / std, (f_te - mean) / std
    out = {}
    for name, y_tr in self.train_labels.items():
      y_tr, y_te = np.asarray(y_tr), np.asarray(self.test_labels[name])
      if self.protocol == "logreg":
        c = select_c(f_tr, y_tr, self.c_grid)
        acc = logreg_accuracy(f_tr, y_tr, f_te, y_te, c)
      else:
        k = int(max(y_tr.max(), y_te.max())) + 1
        head = train_linear_head(f_tr, y_tr, k, **self.mae_kwargs)
        pred = np.argmax(f_te @ np.asarray(head["w"]) + np.asarray(head["b"]),
                         axis=1)
        acc = float(np.mean(pred == y_te))
      out[f"{self.prefix}/{name}_acc"] = acc
      out[f"{self.prefix}/{name}_chance"] = majority_accuracy(y_tr, y_te)
    return out


def _as_dict(labels: Labels) -> dict[str, np.ndarray]:
  if isinstance(labels, Mapping):
    return {k: np.asarray(v) for k, v in labels.items()}
  return {"label": np.asarray(labels)}
