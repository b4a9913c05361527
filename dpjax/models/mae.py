"""Masked autoencoder (He et al. 2022) as used by ViP (Yu et al. 2024).

The encoder is `vit.ViT` run on the visible patches only (`keep_indices`);
the light decoder fills in mask tokens and predicts each patch's pixels. The
random mask is drawn from an explicit per-example key, so the privacy code can
give every example its own randomness (`example["rng"]`) and vmap over
examples: an example's mask depends on its own key only.

Per-example loss for DP-MAE:
  `model.apply(params, images, keys, method=MAE.loss)` -> [B], where keys is
  uint32 [B, 2] (one raw key per example).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import layers
from dpjax.models import vit


def mae_config(variant: str, **overrides: Any) -> dict:
  """Returns `MAE` keyword arguments.

  Args:
    variant: "tiny" (CPU: 32x32 images, patch 4 -> 64 patches, 96-d x 4
      encoder with 4 heads, 64-d x 2 decoder) or a ViT variant such as "B/16"
      ("paper" = "B/16": ViP's 768x12 encoder with the 512-d, 4-block,
      16-head decoder shared by all sizes).
    **overrides: MAE fields (mask_ratio, norm_pix_loss, ...).

  Returns:
    dict(encoder=<ViT kwargs>, decoder_width=, decoder_depth=,
    decoder_heads=, mask_ratio=, norm_pix_loss=).
  """
  if variant == "tiny":
    cfg = dict(encoder=vit.vit_config("mu/4", use_cls_token=True),
               decoder_width=64, decoder_depth=2, decoder_heads=4)
  else:
    variant = "B/16" if variant == "paper" else variant
    cfg = dict(encoder=vit.vit_config(variant, use_cls_token=True),
               decoder_width=512, decoder_depth=4, decoder_heads=16)
  cfg.update(mask_ratio=0.75, norm_pix_loss=False)
  cfg.update(overrides)
  return cfg


def num_masked(num_patches: int, mask_ratio: float) -> int:
  """Number of masked patches: round(mask_ratio * num_patches)."""
  return int(round(mask_ratio * num_patches))


def random_masking(rng: jax.Array, batch: int, num_patches: int,
                   mask_ratio: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws an independent random mask per example.

  Args:
    rng: uint32 [B, 2] raw keys, one per example (example i's mask depends
      only on rng[i]), or a single [2] key that is split into B keys.
    batch: B.
    num_patches: N.
    mask_ratio: share of patches to mask; exactly round(ratio * N) per
      example.

  Returns:
    keep: int32 [B, K] visible patch indices (K = N - masked).
    mask: float32 [B, N], 1 = masked, 0 = visible.
    restore: int32 [B, N] permutation that undoes the shuffle.
  """
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  single = rng.ndim == (0 if typed else 1)
  keys = jax.random.split(rng, batch) if single else rng
  noise = jax.vmap(lambda k: jax.random.uniform(k, (num_patches,)))(keys)
  shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
  n_keep = num_patches - num_masked(num_patches, mask_ratio)
  keep = shuffle[:, :n_keep]
  mask = (restore >= n_keep).astype(jnp.float32)
  return keep, mask, restore


def mae_targets(images: jax.Array, patch_size: int,
                norm_pix_loss: bool = False) -> jax.Array:
  """Pixel targets [B, N, p*p*C] float32 (per-patch normalised if asked)."""
  target = vit.patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def mae_loss(pred: jax.Array, target: jax.Array,
             mask: jax.Array) -> jax.Array:
  """Per-example MSE on masked patches only (ViP / MAE).

  Args:
    pred: [B, N, P] predicted patch pixels.
    target: [B, N, P] target patch pixels.
    mask: [B, N], 1 = masked.

  Returns:
    float32 [B]: squared error averaged over a patch's pixels, then over
    that example's masked patches; visible patches contribute nothing.
  """
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(err * mask, axis=-1) / jnp.maximum(
      jnp.sum(mask, axis=-1), 1.0)


class MAE(nn.Module):
  """Masked autoencoder with a ViT encoder and a small transformer decoder.

  Attributes:
    encoder: `vit.ViT` keyword arguments (`vit.vit_config`).
    decoder_width: decoder token width.
    decoder_depth: decoder blocks.
    decoder_heads: decoder attention heads.
    mask_ratio: share of patches masked per example.
    norm_pix_loss: normalise targets per patch (ViP: False).
    dtype: computation dtype (params float32).
  """
  encoder: dict
  decoder_width: int = 512
  decoder_depth: int = 4
  decoder_heads: int = 16
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    self.image_encoder = vit.ViT(**self.encoder, dtype=self.dtype,
                                 name="encoder")
    dw = self.decoder_width
    self.decoder_embed = nn.Dense(dw, dtype=self.dtype,
                                  kernel_init=layers.dense_init)
    # A one-row nn.Embed holds the mask token (ghost-clipping friendly).
    self.mask_token = nn.Embed(1, dw, embedding_init=layers.embed_init,
                               dtype=self.dtype)
    self.decoder_blocks = [
        layers.EncoderBlock(self.decoder_heads, 4 * dw, True, self.dtype,
                            name=f"decoder_block_{i}")
        for i in range(self.decoder_depth)]
    self.decoder_norm = layers.layer_norm(self.dtype, "decoder_norm")
    p = self.encoder["patch_size"]
    self.decoder_pred = nn.Dense(p * p * 3, dtype=self.dtype,
                                 kernel_init=layers.dense_init)

  @property
  def _has_cls(self) -> bool:
    return self.encoder.get("use_cls_token", False)

  def __call__(self, images: jax.Array,
               rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masks, encodes the visible patches, reconstructs all patches.

    Args:
      images: [B, H, W, 3].
      rng: uint32 [B, 2] per-example raw keys (or one [2] key, split).

    Returns:
      pred: float32 [B, N, p*p*3] predicted pixels (patchify layout).
      mask: float32 [B, N], 1 = masked.
    """
    p = self.encoder["patch_size"]
    b, h, w, c = images.shape
    if c != 3:
      raise ValueError(f"MAE expects 3 channels, got {c}")
    gh, gw = h // p, w // p
    n = gh * gw
    keep, mask, restore = random_masking(rng, b, n, self.mask_ratio)
    x = self.decoder_embed(self.image_encoder(images, keep_indices=keep))
    if self._has_cls:
      cls, x = x[:, :1], x[:, 1:]
    mask_tok = self.mask_token(jnp.zeros((1,), jnp.int32))[None]
    mask_tok = jnp.broadcast_to(mask_tok, (b, n - keep.shape[1],
                                           self.decoder_width))
    x = jnp.concatenate([x, mask_tok.astype(x.dtype)], axis=1)
    x = jnp.take_along_axis(x, restore[..., None], axis=1)
    pos = layers.sincos_2d(gh, gw, self.decoder_width)
    x = x + jnp.asarray(pos, dtype=x.dtype)[None]
    if self._has_cls:
      x = jnp.concatenate([cls, x], axis=1)
    for block in self.decoder_blocks:
      x = block(x)
    x = self.decoder_pred(self.decoder_norm(x))
    if self._has_cls:
      x = x[:, 1:]
    return x.astype(jnp.float32), mask

  def targets(self, images: jax.Array) -> jax.Array:
    """[B, N, p*p*3] float32 reconstruction targets."""
    return mae_targets(images, self.encoder["patch_size"], self.norm_pix_loss)

  def loss(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Per-example masked-patch MSE, float32 [B] (see `mae_loss`)."""
    pred, mask = self(images, rng)
    return mae_loss(pred, self.targets(images), mask)

  def features(self, images: jax.Array,
               last_k: Optional[int] = None) -> jax.Array:
    """Linear-probe features from the unmasked encoder.

    Args:
      images: [B, H, W, 3].
      last_k: None: mean-pooled final (LayerNormed) patch tokens, [B, D].
        k: MAE protocol, mean-pooled outputs of the last k blocks
        concatenated, [B, k * D].

    Returns:
      float32 features.
    """
    tokens, blocks = self.image_encoder(images, return_blocks=True)
    if last_k is None:
      return vit.pool_tokens(tokens, self._has_cls)
    return vit.last_blocks_features(blocks, last_k, self._has_cls)
