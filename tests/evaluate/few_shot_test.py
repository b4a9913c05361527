"""Tests for dpjax.evaluate.few_shot."""

import jax.numpy as jnp
import numpy as np

from dpjax.evaluate import few_shot

_K, _D = 6, 20


def _data(n, seed, protos, scale):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, _K, n)
  x = scale * protos[y] + rng.normal(size=(n, _D))
  return x.reshape(n, 2, 2, 5).astype(np.float32), y


def feature_fn(params, images):
  return images.reshape(images.shape[0], -1) * params


def test_sample_shots_deterministic_and_balanced():
  labels = np.random.default_rng(0).integers(0, 4, 100)
  a = few_shot.sample_shots(labels, 5, seed=1)
  b = few_shot.sample_shots(labels, 5, seed=1)
  c = few_shot.sample_shots(labels, 5, seed=2)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len(np.unique(a)) == len(a) == 20
  np.testing.assert_array_equal(np.bincount(labels[a]), [5, 5, 5, 5])
  # A class smaller than k contributes all of its examples.
  small = np.array([0, 0, 0, 1])
  np.testing.assert_array_equal(
      np.sort(few_shot.sample_shots(small, 2, 0))[-1], 3)


def test_informative_vs_noise_features():
  protos = np.random.default_rng(0).normal(size=(_K, _D))
  x_tr, y_tr = _data(300, 1, protos, scale=3.0)
  x_te, y_te = _data(300, 2, protos, scale=3.0)
  ev = few_shot.FewShot(feature_fn, x_tr, y_tr, x_te, y_te,
                        shots=(1, 5), seeds=3)
  m = ev.run(jnp.float32(1.0))
  assert set(m) == {"few_shot/1shot_acc", "few_shot/5shot_acc",
                    "few_shot/chance"}
  assert m["few_shot/chance"] == 1 / _K
  assert m["few_shot/5shot_acc"] > 0.85
  assert m["few_shot/5shot_acc"] >= m["few_shot/1shot_acc"] - 0.02
  assert m == ev.run(jnp.float32(1.0))  # Deterministic.
  # Same images, labels unrelated to the features: near chance.
  rng = np.random.default_rng(5)
  ev_noise = few_shot.FewShot(feature_fn, x_tr, rng.integers(0, _K, 300),
                              x_te, rng.integers(0, _K, 300), shots=(5,))
  assert ev_noise.run(jnp.float32(1.0))["few_shot/5shot_acc"] < 1 / _K + 0.1
