"""vmap and auto clipped sums equal a brute-force per-example loop.

The reference is the definition, one example at a time in numpy: skip
padding rows, take the example's gradient, skip it (and count it) if its
norm is not finite, scale it by min(1, C/||g||) (or C/(||g|| + gamma)) and
add it up. NaN/inf sit in padding rows AND in real rows, for a dense, a conv
and an attention model, so the contraction-based sums (issue #24) are
checked to add exactly zero for those rows, not NaN.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import layers
from dpjax.privacy import clipping

B = 8
GAMMA = 0.01
MASK = np.array([1, 1, 0, 1, 1, 0, 1, 1], np.float32)
# Padding rows 2 (NaN) and 5 (inf); real rows 1 (NaN) and 4 (inf).
BAD_ROWS = {2: np.nan, 5: np.inf, 1: np.nan, 4: np.inf}


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


class _Conv(nn.Module):
  """A 3x3 SAME conv (exact fallback under "auto") and a patch conv (fast)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = nn.Conv(6, (2, 2), strides=(2, 2), padding="VALID")(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class _Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.EncoderBlock(num_heads=2, mlp_dim=16)(nn.Dense(8)(x))
    return nn.Dense(3)(jnp.mean(x, axis=1))


MODELS = {"dense": (_Dense, (5,)), "conv": (_Conv, (8, 8, 3)),
          "attention": (_Attention, (6, 4))}


def _setup(name, bad=True):
  module_cls, shape = MODELS[name]
  model = module_cls()
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  x = 2.0 * jax.random.normal(kx, (B,) + shape)
  y = jax.random.normal(ky, (B, 3))
  params = model.init(jax.random.PRNGKey(1), x[:1])["params"]

  def loss_fn(p, ex):
    out = model.apply({"params": p}, ex["x"][None])[0]
    return jnp.sum((out - ex["y"]) ** 2)

  for i, v in BAD_ROWS.items() if bad else ():
    x = x.at[(i,) + (0,) * len(shape)].set(v)
  return loss_fn, params, {"x": x, "y": y}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def _reference(loss_fn, params, batch, c, mode):
  """Loop over examples: (clipped sum, aux) by the definition."""
  grad = jax.jit(jax.value_and_grad(loss_fn))
  total = np.zeros_like(_flat(params))
  aux = dict(loss_sum=0.0, grad_norm_sum=0.0, num_clipped=0, count=0,
             num_nonfinite=0)
  for i in range(B):
    if not MASK[i]:
      continue
    loss, g = grad(params, jax.tree_util.tree_map(lambda x: x[i], batch))
    g = _flat(g)
    n = float(np.sqrt(np.sum(g * g)))
    aux["count"] += 1
    if np.isfinite(float(loss)):
      aux["loss_sum"] += float(loss)
    if not np.isfinite(n):
      aux["num_nonfinite"] += 1
      continue
    aux["grad_norm_sum"] += n
    aux["num_clipped"] += int(n > c)
    total += g * (min(1.0, c / n) if mode == "clip" else c / (n + GAMMA))
  return total, aux


def _clip_norm(loss_fn, params, batch):
  """Median finite real-row norm: about half the real rows get clipped."""
  grads = clipping.per_example_grads(loss_fn)(params, batch)
  norms = np.asarray(jax.vmap(clipping.global_norm)(grads))
  real = norms[(MASK > 0) & np.isfinite(norms)]
  return float(np.median(real))


@pytest.mark.parametrize("method", ["vmap", "auto"])
@pytest.mark.parametrize("mode,micro", [("clip", None), ("normalize", 4)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sum_equals_brute_force_with_nonfinite_rows(name, mode,
                                                            micro, method):
  loss_fn, params, batch = _setup(name)
  c = _clip_norm(loss_fn, params, batch)
  want, want_aux = _reference(loss_fn, params, batch, c, mode)
  assert want_aux["num_nonfinite"] == 2  # Real rows 1 and 4 are non-finite.
  fn = jax.jit(clipping.clipped_grad(loss_fn, c, clipping=mode,
                                     normalize_gamma=GAMMA,
                                     microbatch_size=micro, method=method))
  got, aux = fn(params, batch, jnp.asarray(MASK))
  got = _flat(got)
  assert np.all(np.isfinite(got))
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
  assert float(aux["count"]) == 6.0
  assert float(aux["num_nonfinite"]) == 2.0
  assert float(aux["num_clipped"]) == want_aux["num_clipped"]
  for k in ("loss_sum", "grad_norm_sum"):
    assert float(aux[k]) == pytest.approx(want_aux[k], rel=1e-4), k


@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_bad_rows_add_exactly_zero(method):
  """The batch with NaN/inf rows equals, bitwise, the clean batch with
  those rows masked out (they add exactly 0, not a rounding-size 0)."""
  loss_fn, params, batch = _setup("attention")
  clean = dict(batch, x=_setup("attention", bad=False)[2]["x"])
  fn = jax.jit(clipping.clipped_grad(loss_fn, 1.0, method=method))
  mask = jnp.asarray(MASK)
  got, aux = fn(params, batch, mask)
  want, want_aux = fn(params, clean, mask.at[1].set(0.0).at[4].set(0.0))
  np.testing.assert_array_equal(_flat(got), _flat(want))
  assert float(aux["num_nonfinite"]) == 2.0
  assert float(want_aux["num_nonfinite"]) == 0.0
  assert float(aux["count"]) == float(want_aux["count"]) + 2.0
