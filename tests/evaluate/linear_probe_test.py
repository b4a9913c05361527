"""Tests for dpjax.evaluate.linear_probe."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.evaluate import linear_probe

_K, _H = 5, 4  # Classes; images are [H, H, 3].


def _data(n, seed, protos):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, _K, n)
  x = protos[y] + rng.normal(size=(n, _H * _H * 3))
  return x.reshape(n, _H, _H, 3).astype(np.float32), y


def _setup():
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(_K, _H * _H * 3))
  (x_tr, y_tr), (x_te, y_te) = _data(600, 1, protos), _data(300, 2, protos)
  noise_tr, noise_te = rng.integers(0, 3, 600), rng.integers(0, 3, 300)
  proj = jnp.asarray(rng.normal(size=(_H * _H * 3, 24)), jnp.float32)
  return (x_tr, {"shape": y_tr, "noise": noise_tr},
          x_te, {"shape": y_te, "noise": noise_te}, proj)


def feature_fn(params, images):
  return images.reshape(images.shape[0], -1) @ params


def test_features_batched_matches_direct():
  x_tr, _, _, _, proj = _setup()
  x = x_tr[:37]  # Not a multiple of the batch: exercises padding.
  got = linear_probe.features(feature_fn, proj, x, batch_size=8)
  want = np.asarray(feature_fn(proj, jnp.asarray(x)))
  assert got.shape == (37, 24) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batched_apply_tuple_inputs():
  a, b = np.arange(10.0), np.arange(10.0) * 2
  got = linear_probe.batched_apply(lambda p, x, y: x + y + p, 1.0, (a, b), 4)
  np.testing.assert_allclose(got, 3 * a + 1)


@pytest.mark.parametrize("protocol", ["logreg", "mae"])
def test_informative_high_noise_chance(protocol):
  x_tr, y_tr, x_te, y_te, proj = _setup()
  probe = linear_probe.LinearProbe(feature_fn, x_tr, y_tr, x_te, y_te,
                                   batch_size=128, protocol=protocol,
                                   mae_epochs=30)
  m = probe.run(proj)
  assert set(m) == {f"linear_probe/{n}_{s}" for n in ("shape", "noise")
                    for s in ("acc", "chance")}
  assert m["linear_probe/shape_acc"] > 0.9
  assert m["linear_probe/shape_chance"] < 0.35
  assert abs(m["linear_probe/noise_acc"] - 1 / 3) < 0.1
  # Majority baseline is computed from the train labels on the test set.
  ytr, yte = y_tr["shape"], y_te["shape"]
  assert m["linear_probe/shape_chance"] == np.mean(
      yte == np.bincount(ytr).argmax())


def test_uninformative_features_near_chance():
  x_tr, y_tr, x_te, y_te, _ = _setup()
  zero_fn = lambda p, im: jnp.zeros((im.shape[0], 8)) + p
  probe = linear_probe.LinearProbe(zero_fn, x_tr, y_tr["shape"], x_te,
                                   y_te["shape"])
  m = probe.run(jnp.float32(0.0))
  assert m["linear_probe/label_acc"] <= m["linear_probe/label_chance"] + 0.05


# LARS (trust coefficient 1e-3) moves the head by ~lr * 1e-3 * |w| per step:
# MAE's lr = 0.1 * 16384 / 256 suits its scale; a tiny run needs a large lr.
@pytest.mark.parametrize("optimizer,base_lr",
                         [("sgd", 0.1), ("adam", 0.1), ("lars", 100.0)])
def test_train_linear_head_separable(optimizer, base_lr):
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 300)
  x = np.eye(3)[y] * 3 + 0.3 * rng.normal(size=(300, 3))
  head = linear_probe.train_linear_head(x, y, 3, epochs=20, batch_size=32,
                                        optimizer=optimizer, base_lr=base_lr)
  pred = np.argmax(x @ np.asarray(head["w"]) + np.asarray(head["b"]), 1)
  assert np.mean(pred == y) > 0.9


def test_center_normalize():
  rng = np.random.default_rng(0)
  tr, te = rng.normal(size=(50, 4)) + 3, rng.normal(size=(20, 4)) + 3
  a, b = linear_probe.center_normalize(tr, te)
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0)
  np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0)
  # Centred with the train mean before normalising.
  np.testing.assert_allclose(
      a[0], (tr[0] - tr.mean(0)) / np.linalg.norm(tr[0] - tr.mean(0)))


def test_bad_arguments():
  x_tr, y_tr, x_te, y_te, _ = _setup()
  with pytest.raises(ValueError, match="protocol"):
    linear_probe.LinearProbe(feature_fn, x_tr, y_tr, x_te, y_te,
                             protocol="knn")
  with pytest.raises(ValueError, match="label sets"):
    linear_probe.LinearProbe(feature_fn, x_tr, y_tr, x_te,
                             {"shape": y_te["shape"]})
