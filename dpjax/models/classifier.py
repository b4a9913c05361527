"""Supervised ViT classifier (Bu et al. 2024, DP continual pre-training).

ViT encoder -> pooled tokens -> `nn.Dense` head (zero-initialised, as
big_vision's `head_zeroinit`). Per-example loss for DP training:
`optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y)`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import vit


def classifier_config(variant: str, num_classes: int,
                      **overrides: Any) -> dict:
  """Returns `Classifier` keyword arguments.

  Args:
    variant: "tiny" (ViT "mu/4" for 32x32 CPU runs) or a ViT variant such as
      "B/16" ("paper" = "B/16", fastDP's ViT-Base/16 from scratch).
    num_classes: number of output classes.
    **overrides: Classifier fields (pooling, ...).

  Returns:
    dict(encoder=<ViT kwargs>, num_classes=, pooling=).
  """
  if variant == "tiny":
    variant = "mu/4"
  elif variant == "paper":
    variant = "B/16"
  cfg = dict(encoder=vit.vit_config(variant), num_classes=num_classes,
             pooling="mean")
  cfg.update(overrides)
  return cfg


class Classifier(nn.Module):
  """ViT + pooling + linear head.

  Attributes:
    encoder: `vit.ViT` keyword arguments.
    num_classes: number of classes.
    pooling: "mean" (patch tokens), "mean_all" or "cls" (needs
      encoder use_cls_token=True).
    dtype: computation dtype (params float32; logits float32).
  """
  encoder: dict
  num_classes: int
  pooling: str = "mean"
  dtype: Any = jnp.float32

  def setup(self):
    self.image_encoder = vit.ViT(**self.encoder, dtype=self.dtype,
                                 name="encoder")
    self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                         kernel_init=nn.initializers.zeros)

  def features(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> pooled float32 features [B, D]."""
    tokens = self.image_encoder(images)
    return vit.pool_tokens(tokens, self.encoder.get("use_cls_token", False),
                           self.pooling)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, H, W, C] -> float32 logits [B, num_classes]."""
    del train
    feats = self.features(images).astype(self.dtype)
    return self.head(feats).astype(jnp.float32)
