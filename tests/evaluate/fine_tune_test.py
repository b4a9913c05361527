"""Tests for dpjax.evaluate.fine_tune."""

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.evaluate import fine_tune
from dpjax.evaluate import linear_probe

_H, _D = 4, 4  # Images are [H, H, 1]; features are [D].


def _data(n, seed):
  """Label = sign of pixel 0; all 16 pixels are i.i.d. N(0, 1)."""
  x = np.random.default_rng(seed).normal(size=(n, _H, _H, 1))
  return x.astype(np.float32), (x[:, 0, 0, 0] > 0).astype(np.int32)


def _params():
  """A random tanh layer that all but ignores pixel 0 (weight 1e-3)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(_H * _H, _D)) / np.sqrt(_H * _H)
  w[0] *= 1e-3
  return {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros(_D, jnp.float32)}


def feature_fn(params, images):
  """[B, H, H, 1] -> tanh(x W + b) [B, D]."""
  x = images.reshape(images.shape[0], -1)
  return jnp.tanh(x @ params["w"] + params["b"])


def frozen_fn(params, images):
  return jax.lax.stop_gradient(feature_fn(params, images))


def _evaluator(fn, lr, **kw):
  (x_tr, y_tr), (x_te, y_te) = _data(512, 1), _data(256, 2)
  return fine_tune.FineTune(fn, x_tr, y_tr, x_te, y_te, steps=150,
                            batch_size=64, learning_rate=lr,
                            weight_decay=1e-4, seed=0, **kw)


def test_fine_tuning_the_backbone_beats_frozen_features():
  params = _params()
  before = jax.tree.map(np.array, params)
  tuned = _evaluator(feature_fn, 3e-2).run(params)
  assert set(tuned) == {"fine_tune/acc", "fine_tune/train_acc"}
  assert tuned["fine_tune/acc"] > 0.9 and tuned["fine_tune/train_acc"] > 0.9
  # Same optimizer and steps, gradients stopped at the features: only the
  # head learns, and the frozen features carry almost no label signal.
  head_only = _evaluator(frozen_fn, 3e-2, prefix="frozen").run(params)
  assert head_only["frozen/acc"] < 0.7
  # The logistic-regression linear probe agrees that they are uninformative.
  (x_tr, y_tr), (x_te, y_te) = _data(512, 1), _data(256, 2)
  probe = linear_probe.LinearProbe(feature_fn, x_tr, y_tr, x_te, y_te)
  assert probe.run(params)["linear_probe/label_acc"] < 0.7
  # A zero head that never moves predicts class 0: the class-0 fraction.
  still = _evaluator(feature_fn, 0.0).run(params)
  _, y_te = _data(256, 2)
  assert still["fine_tune/acc"] == np.mean(y_te == 0)
  # run() is pure: the caller's params are unchanged.
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, params))


def test_deterministic_and_head_shape():
  ev = _evaluator(feature_fn, 3e-2)
  a, b = ev.fine_tune(_params()), ev.fine_tune(_params())
  jax.tree.map(np.testing.assert_array_equal, a, b)
  backbone, head = a
  assert head["w"].shape == (_D, 2) and head["b"].shape == (2,)
  assert np.abs(np.asarray(backbone["w"][0])).max() > 10 * np.abs(
      np.asarray(_params()["w"][0])).max()  # The backbone itself learned.
  # K = max label over train AND test + 1.
  x, y = _data(32, 3)
  ft = fine_tune.FineTune(feature_fn, x, y, x, np.full(32, 4), steps=1,
                          batch_size=8, learning_rate=1e-3)
  assert ft.num_classes == 5
  assert ft.fine_tune(_params())[1]["w"].shape == (_D, 5)


def test_head_only_steps_freeze_the_backbone():
  lr = 0.05
  backbone, head = _evaluator(feature_fn, lr, head_only_steps=149,
                              head_learning_rate=0.1).fine_tune(_params())
  moved = float(jnp.max(jnp.abs(backbone["w"] - _params()["w"])))
  # One backbone step of Adam moves a weight by ~lr (|m/sqrt(v)| ~ 1; the
  # moments did accumulate during the head-only steps).
  assert 0 < moved <= 1.5 * lr
  assert float(jnp.max(jnp.abs(head["w"]))) > 0.01  # The head did train.
  backbone, _ = _evaluator(feature_fn, lr).fine_tune(_params())
  assert float(jnp.max(jnp.abs(backbone["w"] - _params()["w"]))) > 5 * lr
