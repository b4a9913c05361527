"""Tests for dpjax.models.text_decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import text_decoder

CFG = dict(vocab_size=50, width=32, depth=2, num_heads=4, mlp_dim=64,
           max_len=12)


def _inputs(b=2, length=10):
  tokens = jax.random.randint(jax.random.PRNGKey(0), (b, length), 1, 50)
  enc = jax.random.normal(jax.random.PRNGKey(1), (b, 7, 24))
  return tokens.astype(jnp.int32), enc


@pytest.mark.parametrize("pos", ["learn", "sincos1d"])
def test_shapes_and_dtype(pos):
  model = text_decoder.TextDecoder(**CFG, pos_embedding=pos)
  tokens, enc = _inputs()
  params = model.init(jax.random.PRNGKey(2), tokens, enc)
  logits = model.apply(params, tokens, enc)
  assert logits.shape == (2, 10, 50) and logits.dtype == jnp.float32
  assert ("pos_embed" in params["params"]) == (pos == "learn")
  # No biases anywhere in the Dense layers when use_bias=False (DP-Cap).
  dp = params["params"]["decoder_embed"]
  assert "bias" not in dp and "bias" not in params["params"]["head"]


def test_causal_mask():
  model = text_decoder.TextDecoder(**CFG)
  tokens, enc = _inputs()
  params = model.init(jax.random.PRNGKey(2), tokens, enc)
  base = model.apply(params, tokens, enc)
  t = 4
  changed = tokens.at[:, t + 1:].set(7)
  out = model.apply(params, changed, enc)
  np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5)
  assert not np.allclose(out[:, t + 1:], base[:, t + 1:], atol=1e-3)


def test_depends_on_encoder_tokens():
  model = text_decoder.TextDecoder(**CFG)
  tokens, enc = _inputs()
  params = model.init(jax.random.PRNGKey(2), tokens, enc)
  a = model.apply(params, tokens, enc)
  b = model.apply(params, tokens, enc + 1.0)
  assert not np.allclose(a, b, atol=1e-3)


def test_too_long_raises_and_bf16_runs():
  model = text_decoder.TextDecoder(**CFG, dtype=jnp.bfloat16)
  tokens, enc = _inputs()
  params = model.init(jax.random.PRNGKey(2), tokens, enc)
  logits = model.apply(params, tokens, enc)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  long_tokens = jnp.ones((2, 13), jnp.int32)
  with pytest.raises(ValueError, match="max_len"):
    model.apply(params, long_tokens, enc)
