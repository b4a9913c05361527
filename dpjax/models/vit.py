"""Vision Transformer encoder (Dosovitskiy et al. 2021) for dpjax.

Pre-LN ViT with a `nn.Conv` patch embedding, fixed 2-D sin-cos or learned
(`nn.Embed`) position embeddings, an optional CLS token and a final
LayerNorm. MAE (`mae.py`) reuses this module through `keep_indices` (encode
only the visible patches); the MAE linear-probe protocol uses
`return_blocks=True` (per-block outputs).

Variants follow big_vision's naming: `vit_config("B/16")`. "mu" is a tiny
CPU size for tests and the small-scale recipes.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models import layers

# width, depth, mlp_dim, num_heads. "mu" is dpjax's CPU size; the others are
# the standard ViT sizes (big_vision `decode_variant`).
VARIANTS = {
    "mu": dict(width=96, depth=4, mlp_dim=384, num_heads=4),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}
_DEFAULT_PATCH = {"mu": 4}


def vit_config(variant: str, **overrides: Any) -> dict[str, Any]:
  """Returns `ViT` keyword arguments for a variant such as "B/16" or "mu/4".

  Args:
    variant: "<size>[/<patch>]", size in `VARIANTS`; patch defaults to 16
      (4 for "mu").
    **overrides: any `ViT` field (e.g. use_bias=False, use_cls_token=True).

  Returns:
    dict with keys width, depth, mlp_dim, num_heads, patch_size and the
    overrides; `ViT(**vit_config(v))` builds the model.
  """
  size, _, patch = variant.partition("/")
  if size not in VARIANTS:
    raise ValueError(f"unknown ViT size {size!r} in {variant!r}; valid: "
                     f"{sorted(VARIANTS)}")
  cfg = dict(VARIANTS[size])
  cfg["patch_size"] = int(patch) if patch else _DEFAULT_PATCH.get(size, 16)
  cfg.update(overrides)
  return cfg


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """Splits images into flattened patches (MAE layout).

  Args:
    images: [B, H, W, C] with H, W divisible by `patch_size`.
    patch_size: patch side p.

  Returns:
    [B, (H/p)*(W/p), p*p*C], patches in row-major order, pixels in (p, p, C)
    order within a patch.
  """
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int,
               grid: Optional[tuple[int, int]] = None) -> jax.Array:
  """Inverse of `patchify`.

  Args:
    patches: [B, N, p*p*C].
    patch_size: patch side p.
    grid: (H/p, W/p); defaults to a square grid.

  Returns:
    images [B, H, W, C].
  """
  b, n, d = patches.shape
  p = patch_size
  if grid is None:
    side = int(round(n**0.5))
    grid = (side, side)
  gh, gw = grid
  if gh * gw != n:
    raise ValueError(f"grid {grid} does not match {n} patches")
  c = d // (p * p)
  x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, c)


def pool_tokens(tokens: jax.Array, has_cls: bool,
                pooling: str = "mean") -> jax.Array:
  """Pools encoder tokens [B, N(+1), D] into [B, D].

  Args:
    tokens: encoder output tokens.
    has_cls: whether token 0 is a CLS token.
    pooling: "mean" (patch tokens only), "mean_all" (all tokens) or "cls".

  Returns:
    [B, D] float32.
  """
  if pooling == "cls":
    if not has_cls:
      raise ValueError("pooling='cls' needs use_cls_token=True")
    out = tokens[:, 0]
  elif pooling == "mean":
    out = jnp.mean(tokens[:, 1:] if has_cls else tokens, axis=1)
  elif pooling == "mean_all":
    out = jnp.mean(tokens, axis=1)
  else:
    raise ValueError(f"unknown pooling {pooling!r}; valid: mean, mean_all, cls")
  return out.astype(jnp.float32)


def last_blocks_features(blocks: list[jax.Array], last_k: int,
                         has_cls: bool) -> jax.Array:
  """MAE linear-probe features: mean-pooled outputs of the last k blocks.

  Args:
    blocks: per-block outputs from `ViT(..., return_blocks=True)`, each
      [B, N(+1), D].
    last_k: number of final blocks to concatenate (ViP default: 12).
    has_cls: whether token 0 is a CLS token (excluded from the mean).

  Returns:
    [B, last_k * D] float32.
  """
  if not 1 <= last_k <= len(blocks):
    raise ValueError(f"last_k={last_k} must be in [1, {len(blocks)}]")
  return jnp.concatenate(
      [pool_tokens(b, has_cls) for b in blocks[-last_k:]], axis=-1)


class ViT(nn.Module):
  """Vision Transformer encoder.

  Attributes:
    width: token width D.
    depth: number of transformer blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of the block MLPs.
    patch_size: patch side p (Conv kernel = stride = p).
    use_bias: biases in the blocks' Dense layers (DP-Cap: False).
    pos_embedding: "sincos2d" (fixed, not a param), "learn" (`nn.Embed`,
      normal(0.02) init) or "learn_sincos" (`nn.Embed` initialised to
      sin-cos, trainable as in ViP's released code).
    use_cls_token: prepend a CLS token (gets no position embedding).
    learn_cls_token: if False the CLS token is a fixed constant, not a
      param (DP-Cap freezes it).
    stem: "patch" (one Conv, kernel = stride = p) or "hmlp" (Touvron et
      al. 2022's hierarchical MLP stem: 2x2 stride-2 Convs, each but the
      last followed by LayerNorm and GELU, log2(p) of them; still a
      per-patch map, so masking and ghost clipping apply unchanged); the
      inner stages have width / 4 channels.
    remat: rematerialise blocks (saves memory at large scale).
    dtype: computation dtype; params are float32.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  use_bias: bool = True
  pos_embedding: str = "sincos2d"
  use_cls_token: bool = False
  learn_cls_token: bool = True
  stem: str = "patch"
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *,
               keep_indices: Optional[jax.Array] = None,
               train: bool = False,
               return_blocks: bool = False):
    """Encodes images.

    Args:
      images: [B, H, W, C] float, H and W divisible by `patch_size`.
      keep_indices: optional int [B, K]: encode only these patches (row-major
        patch index), after adding position embeddings (used by MAE).
      train: unused (no dropout / stochastic depth); kept for API symmetry.
      return_blocks: also return the list of per-block outputs.

    Returns:
      tokens [B, N(+1), D] after the final LayerNorm (N = K if
      `keep_indices` is given), CLS first if used; with `return_blocks`, a
      tuple (tokens, [block_1 ... block_depth] each [B, N(+1), D], before the
      final LayerNorm).
    """
    del train
    x = self._stem(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    n = gh * gw
    x = x.reshape(b, n, d)
    x = x + self._pos_embed(gh, gw).astype(self.dtype)
    if keep_indices is not None:
      x = jnp.take_along_axis(x, keep_indices[..., None], axis=1)
    if self.use_cls_token:
      x = jnp.concatenate([self._cls_token(b), x], axis=1)

    block_cls = nn.remat(layers.EncoderBlock) if self.remat else (
        layers.EncoderBlock)
    blocks = []
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_dim, self.use_bias, self.dtype,
                    name=f"block_{i}")(x)
      blocks.append(x)
    x = layers.layer_norm(self.dtype, "norm")(x)
    return (x, blocks) if return_blocks else x

  def _stem(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] images -> [B, H/p, W/p, D] patch embeddings."""
    p = self.patch_size
    conv = lambda feats, k, name: nn.Conv(
        feats, (k, k), strides=(k, k), padding="VALID", dtype=self.dtype,
        kernel_init=layers.dense_init, name=name)
    if self.stem == "patch":
      return conv(self.width, p, "patch_embed")(x)
    if self.stem != "hmlp":
      raise ValueError(f"unknown stem {self.stem!r}; valid: patch, hmlp")
    stages = int(np.log2(p))
    if p < 2 or 2 ** stages != p:
      raise ValueError(f"stem='hmlp' needs a power-of-two patch_size >= 2, "
                       f"got {p}")
    inner = max(self.width // 4, 1)
    for i in range(stages - 1):
      x = conv(inner, 2, f"stem_{i}")(x)
      x = nn.gelu(layers.layer_norm(self.dtype, f"stem_norm_{i}")(x))
    return conv(self.width, 2, "patch_embed")(x)

  def _pos_embed(self, gh: int, gw: int) -> jax.Array:
    """[N, D] position embeddings for a gh x gw patch grid."""
    n = gh * gw
    if self.pos_embedding == "sincos2d":
      return jnp.asarray(layers.sincos_2d(gh, gw, self.width))
    if self.pos_embedding in ("learn", "learn_sincos"):
      if self.pos_embedding == "learn":
        init = layers.embed_init
      else:
        init = lambda *_: jnp.asarray(layers.sincos_2d(gh, gw, self.width))
      table = nn.Embed(n, self.width, embedding_init=init, dtype=self.dtype,
                       name="pos_embed")
      return table(jnp.arange(n))
    raise ValueError(f"unknown pos_embedding {self.pos_embedding!r}; valid: "
                     "sincos2d, learn, learn_sincos")

  def _cls_token(self, batch: int) -> jax.Array:
    """[B, 1, D] CLS token (an `nn.Embed` row, or a fixed constant)."""
    if self.learn_cls_token:
      cls = nn.Embed(1, self.width, embedding_init=layers.embed_init,
                     dtype=self.dtype, name="cls")(jnp.zeros((1,), jnp.int32))
    else:
      # Frozen random vector, as DP-Cap's frozen (normal 0.02) CLS token.
      rs = np.random.RandomState(0)
      cls = jnp.asarray(0.02 * rs.standard_normal((1, self.width)),
                        dtype=jnp.float32)
    cls = cls.astype(self.dtype)
    return jnp.broadcast_to(cls[None], (batch, 1, self.width))
