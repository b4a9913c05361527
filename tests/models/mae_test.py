"""Tests for dpjax.models.mae."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import mae
from tests.models import checks

ENC = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4,
           use_cls_token=True)
CFG = dict(encoder=ENC, decoder_width=16, decoder_depth=1, decoder_heads=2,
           mask_ratio=0.75)


def _keys(b, seed=0):
  return jax.random.split(jax.random.PRNGKey(seed), b)


@pytest.fixture(scope="module")
def setup():
  model = mae.MAE(**CFG)
  images = jax.random.uniform(jax.random.PRNGKey(5), (3, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images, _keys(3))
  return model, params, images


@pytest.mark.parametrize("ratio,n", [(0.75, 16), (0.5, 10), (0.3, 7)])
def test_exact_mask_count_per_example(ratio, n):
  keep, mask, restore = mae.random_masking(_keys(5), 5, n, ratio)
  masked = int(round(ratio * n))
  np.testing.assert_array_equal(mask.sum(axis=1), [masked] * 5)
  assert keep.shape == (5, n - masked)
  # Visible indices are exactly the unmasked ones, and restore inverts.
  for i in range(5):
    assert set(np.asarray(keep[i])) == set(np.flatnonzero(mask[i] == 0))
    assert sorted(np.asarray(restore[i])) == list(range(n))


def test_masks_differ_by_key_and_depend_only_on_own_key():
  keys = _keys(4)
  _, mask, _ = mae.random_masking(keys, 4, 64, 0.75)
  assert len({tuple(np.asarray(m)) for m in mask}) == 4
  _, other, _ = mae.random_masking(_keys(4, seed=9), 4, 64, 0.75)
  assert not np.array_equal(mask, other)
  for i in range(4):
    _, alone, _ = mae.random_masking(keys[i:i + 1], 1, 64, 0.75)
    np.testing.assert_array_equal(alone[0], mask[i])
  # A single key is split into per-example keys (not shared).
  _, split, _ = mae.random_masking(keys[0], 4, 64, 0.75)
  assert len({tuple(np.asarray(m)) for m in split}) == 4


def test_shapes_and_loss_only_counts_masked(setup):
  model, params, images = setup
  keys = _keys(3)
  pred, mask = model.apply(params, images, keys)
  assert pred.shape == (3, 16, 48) and pred.dtype == jnp.float32
  np.testing.assert_array_equal(mask.sum(1), [12] * 3)
  target = model.apply(params, images, method=mae.MAE.targets)
  loss = mae.mae_loss(pred, target, mask)
  np.testing.assert_allclose(
      model.apply(params, images, keys, method=mae.MAE.loss), loss, rtol=1e-5)
  # Changing targets/predictions of visible patches does not change the loss.
  vis = (1.0 - mask)[..., None]
  np.testing.assert_allclose(mae.mae_loss(pred + 5.0 * vis, target, mask),
                             loss, rtol=1e-6)
  np.testing.assert_allclose(mae.mae_loss(pred, target - 3.0 * vis, mask),
                             loss, rtol=1e-6)
  manual = [np.mean(np.square(pred[i] - target[i])[mask[i] == 1])
            for i in range(3)]
  np.testing.assert_allclose(loss, manual, rtol=1e-5)


def test_norm_pix_targets():
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = mae.mae_targets(images, 4, norm_pix_loss=True)
  np.testing.assert_allclose(t.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(t.std(-1), 1.0, atol=1e-3)


def test_per_example_grads_equal_loop_and_batch(setup):
  model, params, images = setup
  keys = _keys(3)

  def loss(p, x, k):
    return model.apply(p, x[None], k[None], method=mae.MAE.loss)[0]

  batched = model.apply(params, images, keys, method=mae.MAE.loss)
  loss = jax.jit(loss)
  for i in range(3):
    np.testing.assert_allclose(loss(params, images[i], keys[i]), batched[i],
                               rtol=1e-5)
  checks.assert_vmap_grads_match_loop(loss, params, images, keys)


def test_features(setup):
  model, params, images = setup
  f = model.apply(params, images, method=mae.MAE.features)
  f2 = model.apply(params, images, 2, method=mae.MAE.features)
  assert f.shape == (3, 32) and f2.shape == (3, 64)


def test_bf16_runs():
  model = mae.MAE(**CFG, dtype=jnp.bfloat16)
  images = jax.random.uniform(jax.random.PRNGKey(5), (2, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images, _keys(2))
  loss = jax.jit(lambda p, x, k: model.apply(p, x, k, method=mae.MAE.loss))(
      params, images, _keys(2))
  assert loss.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(loss)))


def test_configs_and_b16_param_count():
  tiny = mae.mae_config("tiny")
  assert tiny["encoder"]["patch_size"] == 4 and tiny["mask_ratio"] == 0.75
  cfg = mae.mae_config("B/16")
  assert (cfg["decoder_width"], cfg["decoder_depth"],
          cfg["decoder_heads"]) == (512, 4, 16)
  model = mae.MAE(**cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 224, 224, 3)), _keys(1))
  n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  # ViT-B/16 encoder (~85.8M) + 4-block 512-d decoder (~13.5M).
  assert 98e6 < n < 101e6, n
