"""Tests for dpjax.models.vit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import layers
from dpjax.models import vit
from tests.models import checks

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4)


def _images(b=3, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, 16, 16, 3))


def _init(model, x):
  return model.init(jax.random.PRNGKey(1), x)


@pytest.mark.parametrize("use_cls", [False, True])
def test_output_shapes_and_blocks(use_cls):
  model = vit.ViT(**TINY, use_cls_token=use_cls)
  x = _images()
  params = _init(model, x)
  tokens, blocks = model.apply(params, x, return_blocks=True)
  assert tokens.shape == (3, 16 + use_cls, 32)
  assert len(blocks) == 2 and blocks[-1].shape == tokens.shape
  np.testing.assert_allclose(model.apply(params, x), tokens, atol=1e-6)
  feats = vit.last_blocks_features(blocks, 2, use_cls)
  assert feats.shape == (3, 64)


def test_fixed_embeddings_are_not_params():
  model = vit.ViT(**TINY, use_cls_token=True, learn_cls_token=False)
  params = _init(model, _images())["params"]
  assert "pos_embed" not in params and "cls" not in params
  learned = _init(vit.ViT(**TINY, use_cls_token=True, pos_embedding="learn"),
                  _images())["params"]
  assert learned["pos_embed"]["embedding"].shape == (16, 32)
  assert learned["cls"]["embedding"].shape == (1, 32)


def test_learn_sincos_starts_at_sincos():
  params = _init(vit.ViT(**TINY, pos_embedding="learn_sincos"), _images())
  np.testing.assert_allclose(params["params"]["pos_embed"]["embedding"],
                             layers.sincos_2d(4, 4, 32), atol=1e-6)


def test_keep_indices_selects_tokens():
  # No blocks: tokens are patch embedding + position + final norm only.
  model = vit.ViT(**{**TINY, "depth": 0})
  x = _images()
  params = _init(model, x)
  full = model.apply(params, x)
  keep = jnp.array([[3, 0, 7]] * 3, jnp.int32)
  part = model.apply(params, x, keep_indices=keep)
  np.testing.assert_allclose(part, full[:, [3, 0, 7]], atol=1e-5)


def test_patchify_roundtrip_and_layout():
  x = _images(2)
  patches = vit.patchify(x, 4)
  assert patches.shape == (2, 16, 48)
  np.testing.assert_array_equal(patches[:, 5].reshape(2, 4, 4, 3),
                                x[:, 4:8, 4:8])
  np.testing.assert_array_equal(vit.unpatchify(patches, 4), x)


def test_batch_equals_single_and_vmap_grad_equals_loop():
  model = vit.ViT(**TINY, use_cls_token=True)
  x = _images()
  params = _init(model, x)
  batched = model.apply(params, x)
  for i in range(3):
    np.testing.assert_allclose(model.apply(params, x[i:i + 1])[0], batched[i],
                               atol=1e-5)

  proj = jax.random.normal(jax.random.PRNGKey(2), batched.shape[1:])

  def loss(p, xi):
    return jnp.sum(jnp.tanh(model.apply(p, xi[None])[0]) * proj)

  checks.assert_vmap_grads_match_loop(loss, params, x, rtol=2e-4, atol=1e-5)


def test_bf16_runs_with_f32_params():
  model = vit.ViT(**TINY, dtype=jnp.bfloat16)
  params = _init(model, _images())
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = model.apply(params, _images())
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


def test_vit_config_and_b16_param_count():
  cfg = vit.vit_config("B/16")
  assert cfg == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                     patch_size=16)
  assert vit.vit_config("mu")["patch_size"] == 4
  with pytest.raises(ValueError, match="valid"):
    vit.vit_config("Z/16")
  shapes = jax.eval_shape(vit.ViT(**cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 224, 224, 3)))
  n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
  assert 85e6 < n < 87e6, n  # ViT-B/16 backbone: ~85.8M without a head


def test_hmlp_stem_is_per_patch():
  # Without blocks each token sees only its own patch: changing the pixels of
  # patch 5 (row 1, col 1 of the 4x4 grid) changes token 5 and no other.
  model = vit.ViT(**{**TINY, "depth": 0}, stem="hmlp")
  x = _images()
  params = _init(model, x)
  assert {"stem_0", "stem_norm_0", "patch_embed"} <= set(params["params"])
  assert params["params"]["stem_0"]["kernel"].shape == (2, 2, 3, 8)
  y = x.at[:, 4:8, 4:8, :].add(1.0)
  diff = jnp.abs(model.apply(params, y) - model.apply(params, x)).max((0, 2))
  assert float(diff[5]) > 1e-3
  np.testing.assert_allclose(np.delete(np.asarray(diff), 5), 0.0, atol=1e-6)


def test_stem_errors_name_the_value():
  x = _images()
  with pytest.raises(ValueError, match="power-of-two patch_size.*got 6"):
    _init(vit.ViT(**{**TINY, "patch_size": 6}, stem="hmlp"), x[:, :12, :12])
  with pytest.raises(ValueError, match="unknown stem 'conv'"):
    _init(vit.ViT(**TINY, stem="conv"), x)
