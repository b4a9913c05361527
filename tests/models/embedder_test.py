"""Tests for dpjax.models.embedder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.models import embedder
from tests.models import checks


@pytest.mark.parametrize("variant,dim", [("tiny", 32), ("lenet", 128),
                                         ("vit_tiny", 64)])
def test_embedding_shapes(variant, dim):
  model = embedder.Embedder(**embedder.embedder_config(variant))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 1))
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  emb = model.apply(params, x)
  assert emb.shape == (2, dim) and emb.dtype == jnp.float32
  np.testing.assert_allclose(
      model.apply(params, x, method=embedder.Embedder.embed), emb)
  # Unnormalised output; l2_normalize gives unit rows.
  norms = np.linalg.norm(embedder.l2_normalize(emb), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_head_is_separate_no_bias_glorot():
  head = embedder.Head(num_classes=7)
  hparams = head.init(jax.random.PRNGKey(0), jnp.ones((1, 32)))
  assert set(hparams["params"]["dense"]) == {"kernel"}
  kernel = hparams["params"]["dense"]["kernel"]
  limit = np.sqrt(6.0 / (32 + 7))
  assert kernel.shape == (32, 7) and float(jnp.max(jnp.abs(kernel))) <= limit
  backbone = embedder.Embedder(**embedder.embedder_config("tiny"))
  bparams = backbone.init(jax.random.PRNGKey(1), jnp.ones((1, 16, 16, 1)))
  assert "dense" not in bparams["params"]  # head params never in backbone


def test_per_example_grads_equal_loop():
  backbone = embedder.Embedder(**embedder.embedder_config("tiny"))
  head = embedder.Head(num_classes=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 1))
  y = jnp.array([0, 3, 1])
  params = {"backbone": backbone.init(jax.random.PRNGKey(1), x),
            "head": head.init(jax.random.PRNGKey(2), jnp.ones((1, 32)))}

  def loss(p, xi, yi):
    logits = head.apply(p["head"], backbone.apply(p["backbone"], xi[None]))
    return optax.softmax_cross_entropy_with_integer_labels(logits[0], yi)

  checks.assert_vmap_grads_match_loop(loss, params, x, y)


def test_bf16_and_bad_variant():
  model = embedder.Embedder(**embedder.embedder_config("tiny"),
                            dtype=jnp.bfloat16)
  x = jnp.ones((2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), x)
  out = model.apply(params, x)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="valid"):
    embedder.embedder_config("resnet")
