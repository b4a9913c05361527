"""Per-layer rules of fast clipping: which Flax layers, and their formulas.

Used by `ghost.py` (read it first). For one call of a supported layer, with
per-example input activations ``a_i`` and output gradients ``g_i`` (as
matrices ``A [B, T, d_in]``, ``G [B, T, d_out]``), the per-example weight
gradient is ``A_i^T G_i`` and its squared norm is either

* "gram" (ghost norm): ``<A_i A_i^T, G_i G_i^T>``, cost 2 T^2 (d_in + d_out)
  per example, memory T^2; or
* "outer": ``||A_i^T G_i||^2`` with the per-example gradient of THIS layer
  materialised, cost 2 T d_in d_out, memory d_in d_out per example.

fastDP's rule ("auto") picks gram iff 2 T^2 <= d_in d_out. The bias gradient
is ``sum_t G_i``. The clipped SUM is book-kept: ``A^T diag(c) G`` over all
rows, one matmul like the non-private weight gradient. Embeddings use the
one-hot form: ``(A A^T)_ts = [id_t == id_s]`` and a scatter-add for the sum.

Supported (exact type, default dot_general / promote_dtype / conv function):
`nn.Dense`, `nn.DenseGeneral` (batch_dims=()), `nn.Conv` used as a patch
embedding (kernel_size == strides, no padding, no dilation, one group, 2-D)
and `nn.Embed.__call__`. Everything else returns None from `describe` and
is handled by the per-example-copy fallback in `ghost.py`.
"""

from collections.abc import Iterable
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _field_default(cls, name):
  return cls.__dataclass_fields__[name].default


def _default_math(module) -> bool:
  cls = type(module)
  for name in ("dot_general", "dot_general_cls", "conv_general_dilated",
               "conv_general_dilated_cls", "promote_dtype", "mask"):
    if name in cls.__dataclass_fields__:
      if getattr(module, name) is not _field_default(cls, name):
        return False
  return True


def describe(module, method_name: str, args, kwargs) -> Optional[dict]:
  """Static description of a supported layer call, or None.

  Args:
    module: the bound Flax module being called.
    method_name: the method called.
    args: positional arguments (per-example arrays inside vmap).
    kwargs: keyword arguments.

  Returns:
    dict with "kind" ("dense" | "embed"), "params" (the expected parameter
    names), the layout needed to turn the input into a matrix and, for
    DenseGeneral, "kernel_shape" (the kernel layout the formulas assume);
    None if the call is not supported.
  """
  if method_name != "__call__" or kwargs or len(args) != 1:
    return None
  if not _default_math(module):
    return None
  x = args[0]
  cls = type(module)
  if cls is nn.Embed:
    if not jnp.issubdtype(x.dtype, jnp.integer):
      return None
    return dict(kind="embed", params=("embedding",),
                vocab=module.num_embeddings)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return None
  bias = ("bias",) if module.use_bias else ()
  if cls is nn.Dense:
    return dict(kind="dense", layout="last", params=("kernel",) + bias,
                d_in=x.shape[-1], d_out=module.features)
  if cls is nn.DenseGeneral:
    if tuple(module.batch_dims or ()):
      return None
    # Exactly as flax's DenseGeneral (_canonicalize_tuple, _normalize_axes):
    # the contracted axes are made non-negative and SORTED, and the kernel's
    # leading dims follow that sorted order whatever order `axis` lists them
    # in (axis=(2, 1) builds the same kernel layout as axis=(1, 2)).
    axis = _canonical_tuple(module.axis)
    if any(not -x.ndim <= a < x.ndim for a in axis):
      return None
    axis = tuple(sorted(a + x.ndim if a < 0 else a for a in axis))
    if len(set(axis)) != len(axis):
      return None
    feats = _canonical_tuple(module.features)
    # `kernel_shape`: ghost.py checks the layer's kernel against it and takes
    # the exact fallback on a mismatch (a Flax whose layout differs).
    return dict(kind="dense", layout="general", axis=axis,
                params=("kernel",) + bias,
                kernel_shape=tuple(x.shape[a] for a in axis) + feats,
                d_in=int(np.prod([x.shape[a] for a in axis])),
                d_out=int(np.prod(feats)))
  if cls is nn.Conv:
    return _describe_patch_conv(module, x, bias)
  return None


def _canonical_tuple(x) -> tuple:
  # flax.linen.linear._canonicalize_tuple: any iterable -> tuple, else (x,).
  return tuple(x) if isinstance(x, Iterable) else (x,)


def _describe_patch_conv(module, x, bias) -> Optional[dict]:
  ks = module.kernel_size
  ks = tuple(ks) if isinstance(ks, (tuple, list)) else (ks,)
  if len(ks) != 2 or x.ndim < 3 or module.feature_group_count != 1:
    return None
  strides = module.strides
  strides = ((strides,) * 2 if isinstance(strides, int) or strides is None
             else tuple(strides))
  if strides != ks:
    return None
  for dil in (module.input_dilation, module.kernel_dilation):
    if dil not in (None, 1) and tuple(dil) != (1, 1):
      return None
  h, w = x.shape[-3], x.shape[-2]
  pad = module.padding
  divisible = h % ks[0] == 0 and w % ks[1] == 0
  no_pad = (pad == "VALID" or (pad == "SAME" and divisible) or
            (not isinstance(pad, str) and
             np.all(np.asarray(pad, dtype=object) == 0)))
  if not no_pad:
    return None
  return dict(kind="dense", layout="patch", patch=ks,
              params=("kernel",) + bias,
              d_in=ks[0] * ks[1] * x.shape[-1], d_out=module.features)


def to_matrix(desc: dict, module, x: jax.Array) -> jax.Array:
  """Per-example layer input -> the matrix the kernel multiplies.

  Args:
    desc: from `describe`.
    module: the module (for its computation dtype).
    x: one example's input to the layer.

  Returns:
    "dense": [T, d_in] in the layer's computation dtype; "embed": int [T].
  """
  if desc["kind"] == "embed":
    ids = x.reshape(-1)
    if desc["vocab"] == 1:  # flax broadcasts the single row.
      return jnp.zeros_like(ids)
    return jnp.where(ids < 0, ids + desc["vocab"], ids)
  # As flax's promote_dtype: the module dtype, else input and param promoted.
  dtype = module.dtype or jnp.promote_types(x.dtype, module.param_dtype)
  x = x.astype(dtype)
  if desc["layout"] == "last":
    return x.reshape(-1, desc["d_in"])
  if desc["layout"] == "general":
    free = [i for i in range(x.ndim) if i not in desc["axis"]]
    x = jnp.transpose(x, free + list(desc["axis"]))
    return x.reshape(-1, desc["d_in"])
  ph, pw = desc["patch"]  # Patch conv: crop (VALID), then im2col by reshape.
  h, w, c = x.shape[-3:]
  gh, gw = h // ph, w // pw
  x = x[..., :gh * ph, :gw * pw, :].reshape(-1, gh, ph, gw, pw, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(-1, ph * pw * c)


def pick_mode(desc: dict, t: int, method: str, share: int = 1) -> str:
  """"gram" or "outer" for one call with T rows per example.

  "ghost" always takes the Gram form. "auto" takes the one with fewer FLOPs:
  Gram 2 T^2 (d_in / share + d_out) (the input Gram is computed once for
  `share` layers reading the same input, e.g. query/key/value) against
  outer 2 T d_in d_out; both are transient per layer (memory B T^2 against
  B d_in d_out) and reduced to [B] at once.
  """
  if method == "ghost":
    return "gram"
  if desc["kind"] == "embed":
    return "gram" if t * t <= desc["vocab"] else "outer"
  d, p = desc["d_in"], desc["d_out"]
  return "gram" if t * (d / share + p) <= d * p else "outer"


def gram(a: jax.Array, dtype: Any) -> jax.Array:
  """Per-example Gram matrices [B, T, T] (float32) of rows of a [B, T, d]."""
  return _dot("btd,bsd->bts", a, a, dtype)


def _dot(spec, x, y, dtype):
  return jnp.einsum(spec, x.astype(dtype), y.astype(dtype),
                    preferred_element_type=jnp.float32)


def sq_norms(desc: dict, mode: str, a: jax.Array, g: jax.Array,
             dtype: Any, a_gram: Optional[jax.Array] = None) -> jax.Array:
  """Squared per-example gradient norm of all params of one call.

  Args:
    desc: from `describe`.
    mode: "gram" or "outer".
    a: [B, T, d_in] (dense) or int [B, T] (embed).
    g: [B, T, d_out] output gradients.
    dtype: dtype of the matmul operands (float32, or bfloat16 for mixed
      precision); accumulation and the result are float32.

  Returns:
    float32 [B].
  """
  if desc["kind"] == "embed":
    valid = (a >= 0) & (a < desc["vocab"])
    g = jnp.where(valid[..., None], g, 0)
    if mode == "gram":
      same = (a[:, :, None] == a[:, None, :]).astype(jnp.float32)
      return jnp.sum(same * _dot("btp,bsp->bts", g, g, dtype), axis=(1, 2))
    onehot = jax.nn.one_hot(a, desc["vocab"], dtype=dtype)
    per = _dot("btv,btp->bvp", onehot, g, dtype)
    return jnp.sum(jnp.square(per), axis=(1, 2))
  if mode == "gram":
    a_gram = gram(a, dtype) if a_gram is None else a_gram
    sq = jnp.sum(a_gram * gram(g, dtype), axis=(1, 2))
  else:
    sq = jnp.sum(jnp.square(_dot("btd,btp->bdp", a, g, dtype)), axis=(1, 2))
  if "bias" in desc["params"]:
    sq = sq + jnp.sum(jnp.square(jnp.sum(g.astype(jnp.float32), axis=1)),
                      axis=-1)
  return sq


def clipped_sums(desc: dict, a: jax.Array, cg: jax.Array, shapes: dict,
                 dtype: Any) -> dict:
  """Book-kept sum over examples of clipped per-example gradients.

  Args:
    desc: from `describe`.
    a: [B, T, d_in] (dense, rows of padding examples zeroed) or int [B, T].
    cg: [B, T, d_out] output gradients already scaled by each example's clip
      factor (0 for padding rows).
    shapes: param name -> param shape.
    dtype: matmul operand dtype (accumulation in float32).

  Returns:
    param name -> float32 array of that param's shape.
  """
  if desc["kind"] == "embed":
    d = cg.shape[-1]
    emb = jax.ops.segment_sum(cg.reshape(-1, d).astype(jnp.float32),
                              a.reshape(-1), num_segments=desc["vocab"])
    return {"embedding": emb.reshape(shapes["embedding"])}
  # One 2-D matmul over the B*T rows: XLA:CPU runs a dot with two
  # contracting dims ("btd,btp->dp") ~4x slower than this (free) reshape.
  a2, g2 = a.reshape(-1, a.shape[-1]), cg.reshape(-1, cg.shape[-1])
  kernel = jnp.matmul(a2.T.astype(dtype), g2.astype(dtype),
                      preferred_element_type=jnp.float32)
  out = {"kernel": kernel.reshape(shapes["kernel"])}
  if "bias" in desc["params"]:
    out["bias"] = jnp.sum(cg.astype(jnp.float32), axis=(0, 1)).reshape(
        shapes["bias"])
  return out
