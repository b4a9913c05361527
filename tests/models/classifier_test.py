"""Tests for dpjax.models.classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.models import classifier
from tests.models import checks

ENC = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4)


@pytest.mark.parametrize("pooling,use_cls", [("mean", False), ("cls", True)])
def test_shapes_and_zero_head(pooling, use_cls):
  model = classifier.Classifier(encoder=dict(ENC, use_cls_token=use_cls),
                                num_classes=5, pooling=pooling)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  logits = model.apply(params, x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)  # zero-initialised head
  feats = model.apply(params, x, method=classifier.Classifier.features)
  assert feats.shape == (2, 32)


def test_per_example_grads_equal_loop():
  model = classifier.Classifier(encoder=ENC, num_classes=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3))
  y = jnp.array([0, 3, 1])
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)

  def loss(p, xi, yi):
    logits = model.apply(p, xi[None])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi)

  checks.assert_vmap_grads_match_loop(loss, params, x, y)


def test_config_and_bf16():
  cfg = classifier.classifier_config("tiny", num_classes=10)
  assert cfg["num_classes"] == 10 and cfg["encoder"]["patch_size"] == 4
  assert classifier.classifier_config("paper", 1000)["encoder"]["width"] == 768
  model = classifier.Classifier(**cfg, dtype=jnp.bfloat16)
  x = jnp.ones((1, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert jax.jit(model.apply)(params, x).dtype == jnp.float32
