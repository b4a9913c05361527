"""Autoregressive text decoder with cross-attention (DP-Cap captioner head).

Token `nn.Embed` + position embeddings, pre-LN blocks of causal
self-attention, cross-attention to the (projected) encoder tokens and a GELU
MLP, then a final LayerNorm and an `nn.Dense` to the vocabulary. The
encoder tokens are first mapped to the decoder width by `decoder_embed`
(DP-Cap `models_mae.py`), which is also what DP-Cap's linear probe pools.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import layers


class TextDecoder(nn.Module):
  """Causal transformer decoder over tokens, attending to encoder tokens.

  Attributes:
    vocab_size: vocabulary size V (pad id 0 is an ordinary row).
    width: decoder width D.
    depth: number of decoder blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    max_len: maximum number of input tokens (position table size).
    use_bias: biases in all Dense layers (DP-Cap: False).
    pos_embedding: "learn" (`nn.Embed`) or "sincos1d" (fixed).
    remat: rematerialise blocks.
    dtype: computation dtype; params float32; logits returned in float32.
  """
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int
  use_bias: bool = False
  pos_embedding: str = "learn"
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    dense = lambda f, name: nn.Dense(f, use_bias=self.use_bias,
                                     dtype=self.dtype,
                                     kernel_init=layers.dense_init, name=name)
    self.decoder_embed = dense(self.width, "decoder_embed")
    self.token_embed = nn.Embed(self.vocab_size, self.width,
                                embedding_init=layers.embed_init,
                                dtype=self.dtype)
    if self.pos_embedding == "learn":
      self.pos_embed = nn.Embed(self.max_len, self.width,
                                embedding_init=layers.embed_init,
                                dtype=self.dtype)
    elif self.pos_embedding != "sincos1d":
      raise ValueError(f"unknown pos_embedding {self.pos_embedding!r}; "
                       "valid: learn, sincos1d")
    block_cls = nn.remat(layers.DecoderBlock) if self.remat else (
        layers.DecoderBlock)
    self.blocks = [
        block_cls(self.num_heads, self.mlp_dim, self.use_bias, self.dtype,
                  name=f"block_{i}") for i in range(self.depth)]
    self.norm = layers.layer_norm(self.dtype, "norm")
    self.head = dense(self.vocab_size, "head")

  def project_encoder(self, encoder_tokens: jax.Array) -> jax.Array:
    """`decoder_embed`: [B, N, De] encoder tokens -> [B, N, D]."""
    return self.decoder_embed(encoder_tokens.astype(self.dtype))

  def __call__(self, tokens: jax.Array,
               encoder_tokens: jax.Array) -> jax.Array:
    """Next-token logits under a causal mask.

    Args:
      tokens: int32 [B, L] input tokens, L <= max_len (pad id 0; pads only
        sit after the caption, so the causal mask keeps them from affecting
        real positions and the loss ignores pad targets).
      encoder_tokens: [B, N, De] image tokens (encoder width De).

    Returns:
      float32 logits [B, L, V]; logits[:, t] predicts the token after
      tokens[:, t] and depends only on tokens[:, :t+1].
    """
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"{length} tokens > max_len {self.max_len}")
    memory = self.project_encoder(encoder_tokens)
    x = self.token_embed(tokens)
    if self.pos_embedding == "learn":
      pos = self.pos_embed(jnp.arange(length))
    else:
      pos = jnp.asarray(layers.sincos_1d(length, self.width))
    x = x + pos.astype(self.dtype)[None]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    for block in self.blocks:
      x = block(x, memory, causal)
    x = self.norm(x)
    return self.head(x).astype(jnp.float32)
