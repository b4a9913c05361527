"""Embedding backbone and client-local head for DP-FedEmb (Xu et al. 2023).

`Embedder` (the backbone, aggregated with DP-FedAvg) maps images to an
unnormalised embedding; `Head` (no bias, Glorot init) maps embeddings to
local identity logits. They are SEPARATE modules with separate params: the
head is initialised fresh in each client computation, trained locally and
never aggregated, so it must never be part of the backbone's params.

    backbone = Embedder(**embedder_config("tiny"))
    head = Head(num_classes)
    emb = backbone.apply(bparams, images)          # [B, E], unnormalised
    logits = head.apply(hparams, emb)              # [B, num_classes]

Only `l2_normalize` (at evaluation) normalises the embedding.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import layers
from dpjax.models import vit


def embedder_config(variant: str, **overrides: Any) -> dict:
  """Returns `Embedder` keyword arguments.

  Args:
    variant: "tiny" (2-conv CNN, 16/32 channels, 32-d embedding, for the
      16x16 glyph identities), "lenet" (DP-FedEmb EMNIST LeNet: 5x5 convs with
      32 and 64 filters, 128-d embedding) or "vit_tiny" (ViT "mu/4").
    **overrides: Embedder fields.

  Returns:
    dict(kind=, embed_dim=, features=) or, for ViT, dict(kind="vit",
    embed_dim=, encoder=<ViT kwargs>).
  """
  configs = {
      "tiny": dict(kind="cnn", embed_dim=32, features=(16, 32)),
      "lenet": dict(kind="cnn", embed_dim=128, features=(32, 64)),
      "vit_tiny": dict(kind="vit", embed_dim=64,
                       encoder=vit.vit_config("mu/4", depth=2)),
  }
  if variant not in configs:
    raise ValueError(f"unknown embedder variant {variant!r}; valid: "
                     f"{sorted(configs)}")
  cfg = dict(configs[variant])
  cfg.update(overrides)
  return cfg


def l2_normalize(embeddings: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise L2 normalisation [B, E] -> [B, E] (evaluation only)."""
  norm = jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
  return embeddings / jnp.maximum(norm, eps)


class Embedder(nn.Module):
  """Image -> embedding backbone: small CNN (LayerNorm, no BatchNorm) or ViT.

  Attributes:
    kind: "cnn" or "vit".
    embed_dim: output embedding width E.
    features: CNN channel counts, one 5x5 conv + LayerNorm + ReLU + 2x2 max
      pool per entry (kind="cnn").
    encoder: `vit.ViT` keyword arguments (kind="vit"); tokens mean-pooled.
    dtype: computation dtype (params float32; output float32).
  """
  kind: str = "cnn"
  embed_dim: int = 128
  features: Sequence[int] = (32, 64)
  encoder: dict | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, H, W, C] images -> float32 [B, embed_dim] (unnormalised)."""
    del train
    x = images.astype(self.dtype)
    if self.kind == "cnn":
      for i, f in enumerate(self.features):
        x = nn.Conv(f, (5, 5), padding="SAME", dtype=self.dtype,
                    name=f"conv_{i}")(x)
        # LayerNorm over channels at each pixel: per-example, no batch stats.
        x = layers.layer_norm(self.dtype, f"norm_{i}")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
      x = x.reshape(x.shape[0], -1)
    elif self.kind == "vit":
      if self.encoder is None:
        raise ValueError("kind='vit' needs the `encoder` (ViT) config")
      tokens = vit.ViT(**self.encoder, dtype=self.dtype, name="encoder")(x)
      x = vit.pool_tokens(tokens, self.encoder.get("use_cls_token", False))
      x = x.astype(self.dtype)
    else:
      raise ValueError(f"unknown embedder kind {self.kind!r}; valid: cnn, vit")
    x = nn.Dense(self.embed_dim, dtype=self.dtype,
                 kernel_init=layers.dense_init, name="embed")(x)
    return x.astype(jnp.float32)

  def embed(self, images: jax.Array) -> jax.Array:
    """Alias of `__call__`: [B, H, W, C] -> [B, E]."""
    return self(images)


class Head(nn.Module):
  """Client-local classification head: Dense(num_classes, no bias, Glorot).

  Attributes:
    num_classes: number of local identities / classes.
  """
  num_classes: int

  @nn.compact
  def __call__(self, embeddings: jax.Array) -> jax.Array:
    """float [B, E] -> float32 logits [B, num_classes]."""
    return nn.Dense(self.num_classes, use_bias=False,
                    kernel_init=nn.initializers.glorot_uniform(),
                    name="dense")(embeddings.astype(jnp.float32))
