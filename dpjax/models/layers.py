"""Shared transformer building blocks for dpjax models.

Every trainable parameter lives in a standard Flax layer (`nn.Dense`,
`nn.Conv`, `nn.Embed`, `nn.LayerNorm`) so that ghost clipping can compute
per-example gradient norms by intercepting those layer types. Attention is
written here with plain `nn.Dense` projections (query/key/value/out) rather
than `nn.MultiHeadDotProductAttention` (which uses `DenseGeneral`).

No layer mixes information across the batch axis, so every module gives the
same outputs for an example whether it is called alone or inside a batch,
which per-example gradients under `jax.vmap` rely on.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

LN_EPS = 1e-6
dense_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)


def layer_norm(dtype: Dtype, name: Optional[str] = None) -> nn.LayerNorm:
  """LayerNorm with the epsilon used by MAE / big_vision."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


def sincos_1d(length: int, width: int) -> np.ndarray:
  """Fixed 1-D sin-cos position embeddings (Vaswani et al.).

  Args:
    length: number of positions.
    width: embedding width (even).

  Returns:
    float32 array [length, width]: sin half, then cos half.
  """
  assert width % 2 == 0, f"sincos width must be even, got {width}"
  omega = np.arange(width // 2, dtype=np.float64) / (width / 2.0)
  omega = 1.0 / 10000**omega
  out = np.arange(length, dtype=np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_2d(h: int, w: int, width: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings as in MAE / big_vision.

  Args:
    h: grid height (patches).
    w: grid width (patches).
    width: embedding width (divisible by 4).

  Returns:
    float32 array [h * w, width]; first half encodes the row, second the
    column (row-major patch order, matching `vit.patchify`).
  """
  assert width % 4 == 0, f"sincos2d width must be divisible by 4, got {width}"
  rows = np.repeat(np.arange(h), w)
  cols = np.tile(np.arange(w), h)
  omega = np.arange(width // 4, dtype=np.float64) / (width / 4.0)
  omega = 1.0 / 10000**omega
  r = rows[:, None] * omega[None, :]
  c = cols[:, None] * omega[None, :]
  emb = np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)
  return emb.astype(np.float32)


class Attention(nn.Module):
  """Multi-head dot-product attention with `nn.Dense` projections.

  Self-attention when `kv` is None, cross-attention otherwise. Logits and
  softmax are computed in float32 whatever `dtype` is.

  Attributes:
    num_heads: number of heads; the query width must be divisible by it.
    use_bias: whether the four projections have biases.
    dtype: computation dtype (params stay float32).
  """
  num_heads: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Attends from `x` [B, L, D] to `kv` [B, S, Dkv] (default: `x`).

    Args:
      x: queries [B, L, D].
      kv: keys/values source [B, S, Dkv]; None for self-attention.
      mask: optional boolean mask broadcastable to [B, heads, L, S]; True
        means "may attend".

    Returns:
      [B, L, D] in `dtype`.
    """
    kv = x if kv is None else kv
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} not divisible by num_heads "
                       f"{self.num_heads}")
    hd = d // self.num_heads
    dense = lambda name: nn.Dense(d, use_bias=self.use_bias, dtype=self.dtype,
                                  kernel_init=dense_init, name=name)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, hd))
    q = split(dense("query")(x))
    k = split(dense("key")(kv))
    v = split(dense("value")(kv))
    logits = jnp.einsum("blhd,bshd->bhls", q, k).astype(jnp.float32)
    logits = logits * (hd**-0.5)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhls,bshd->blhd", weights, v)
    out = out.reshape(out.shape[:-2] + (d,))
    return dense("out")(out)


class Mlp(nn.Module):
  """Two-layer GELU MLP: Dense(mlp_dim) -> GELU -> Dense(width)."""
  mlp_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, use_bias=self.use_bias, dtype=self.dtype,
                 kernel_init=dense_init, name="fc1")(x)
    # Exact (erf) GELU as in PyTorch nn.GELU, which MAE / DP-Cap use.
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, use_bias=self.use_bias, dtype=self.dtype,
                    kernel_init=dense_init, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, N, D]."""
    y = layer_norm(self.dtype, "norm1")(x)
    x = x + Attention(self.num_heads, self.use_bias, self.dtype,
                      name="attn")(y)
    y = layer_norm(self.dtype, "norm2")(x)
    return x + Mlp(self.mlp_dim, self.use_bias, self.dtype, name="mlp")(y)


class DecoderBlock(nn.Module):
  """Pre-LN decoder block: causal self-attn, cross-attn, MLP."""
  num_heads: int
  mlp_dim: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array,
               self_mask: jax.Array) -> jax.Array:
    """Decodes `x` [B, L, D] attending to `memory` [B, S, D].

    Args:
      x: token activations [B, L, D].
      memory: encoder tokens already projected to width D, [B, S, D].
      self_mask: boolean [L, L] (or broadcastable to [B, H, L, L]) mask.

    Returns:
      [B, L, D].
    """
    y = layer_norm(self.dtype, "norm1")(x)
    x = x + Attention(self.num_heads, self.use_bias, self.dtype,
                      name="self_attn")(y, mask=self_mask)
    y = layer_norm(self.dtype, "norm2")(x)
    x = x + Attention(self.num_heads, self.use_bias, self.dtype,
                      name="cross_attn")(y, kv=memory)
    y = layer_norm(self.dtype, "norm3")(x)
    return x + Mlp(self.mlp_dim, self.use_bias, self.dtype, name="mlp")(y)
