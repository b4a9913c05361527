r"""Micro-benchmark: ways to sum clipped per-example gradients after vmap.

The vmap DP step is vmap(value_and_grad) -> per-example norms -> a clipped
sum. This times the whole step with the sum written several ways, interleaved
in one process (rep r runs every variant once; the ratio to a non-private
`jax.grad` step is taken per rep, then the median). Each variant's sum is
first checked against the plain (unsafe) contraction on a clean batch, and
every NaN-safe variant is checked to add exactly zero for a padding row and
a real row holding NaN / inf. Temp MiB: XLA's temporaries of the compiled
step (`memory_analysis()`), deterministic.

  where       sum(where(keep, g * factor, 0), axis=0)     (dpjax before #24)
  dot         tensordot(factor, g)                         (NaN-UNSAFE)
  dot_where   tensordot(factor, where(finite_row, g, 0))
  dot_nan0    tensordot(factor, nan_to_num(g, 0, 0, 0))
  dot_cond    lax.cond(all rows finite, dot, dot_where)
  cond_id     lax.cond(all rows finite, g, where(...)), then dot
  dot_loop    zero the non-finite rows in place (a fori_loop over those rows
              only, dynamic_update_slice), then dot
  loop_where  where(finite_row, g, 0) in a fori_loop run 0 or 1 times (in
              place), then dot: privacy.rows.zero_rows   (dpjax after #24)

Run from the repository root (by hand):
  PYTHONPATH=. .venv/bin/python benchmarks/clip_sum_variants.py
  ... --width 96 --batch 64 --reps 5 --variants where,dot,dot_loop
"""

import argparse
import functools
import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpjax.privacy import clipping
from dpjax.privacy import rows

C = _common.C
SAFE = ("where", "dot_where", "dot_nan0", "dot_cond", "cond_id", "dot_loop",
        "loop_where")


def _rows(x: jax.Array, v: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _dot(factor, g):
  return jnp.tensordot(factor, g.astype(jnp.float32), axes=1)


def _sum(kind: str) -> Callable:
  """leaf sum (g [B, ...], factor [B], keep [B], all_finite) -> [...]."""
  def where(g, f, keep, ok):
    return jnp.sum(jnp.where(_rows(g, keep), g * _rows(g, f), 0.0), axis=0)

  def dot(g, f, keep, ok):
    return _dot(f, g)

  def dot_where(g, f, keep, ok):
    return _dot(f, jnp.where(_rows(g, keep), g, 0.0))

  def dot_nan0(g, f, keep, ok):
    return _dot(f, jnp.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))

  return dict(where=where, dot=dot, dot_where=dot_where,
              dot_nan0=dot_nan0)[kind]


def _zero_rows_by_index(tree, finite):
  """Zeroes the rows where ~finite in place: a while loop over those rows
  (none in the common case), so no second B x params buffer."""
  leaves, treedef = jax.tree.flatten(tree)
  order = jnp.argsort(finite, stable=True)  # non-finite rows first.
  num_bad = jnp.sum(~finite)

  def body(k, xs):
    i = order[k]
    return [jax.lax.dynamic_update_index_in_dim(
        x, jnp.zeros(x.shape[1:], x.dtype), i, 0) for x in xs]

  return treedef.unflatten(jax.lax.fori_loop(0, num_bad, body, leaves))


def step(loss_fn: Callable, kind: str) -> Callable:
  """jit(params, batch, mask) -> clipped sum with the given sum variant."""
  vg = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))

  def fn(params, batch, mask):
    _, grads = vg(params, batch)
    norms = jax.vmap(clipping.global_norm)(grads)
    finite = jnp.isfinite(norms)
    keep = (mask > 0) & finite
    factor = jnp.where(keep, rows.clip_factor(norms, C), 0.0)
    if kind == "dot_cond":
      fast = lambda g: jax.tree.map(lambda x: _dot(factor, x), g)
      slow = lambda g: jax.tree.map(
          lambda x: _dot(factor, jnp.where(_rows(x, finite), x, 0.0)), g)
      return jax.lax.cond(jnp.all(finite), fast, slow, grads)
    if kind == "cond_id":
      clean = jax.lax.cond(
          jnp.all(finite), lambda g: g, lambda g: jax.tree.map(
              lambda x: jnp.where(_rows(x, finite), x, 0.0), g), grads)
      return jax.tree.map(lambda x: _dot(factor, x), clean)
    if kind == "loop_where":
      return jax.tree.map(lambda x: _dot(factor, x),
                          rows.zero_rows(grads, ~finite))
    if kind == "dot_loop":
      return jax.tree.map(lambda x: _dot(factor, x),
                          _zero_rows_by_index(grads, finite))
    leaf = _sum(kind)
    return jax.tree.map(lambda g: leaf(g, factor, keep, None), grads)

  return jax.jit(fn)


def setting(width: int, batch: int):
  """peers.py's vit_narrow at `width` (4 blocks, 32px / patch 4)."""
  cfg = dict(width=width, depth=4, mlp_dim=4 * width,
             num_heads=max(width // 64, 1), patch_size=4)
  params, loss_fn, batch_fn = _common.vit_setting(cfg, 32)
  return params, loss_fn, batch_fn(batch)


def check(fns, params, data, mask):
  """Clean batch: all variants equal `dot`. Bad rows: SAFE ones add 0."""
  ref = _common.flat(fns["dot"](params, data, mask))
  for k, f in fns.items():
    np.testing.assert_allclose(_common.flat(f(params, data, mask)), ref,
                               rtol=2e-4, atol=1e-6, err_msg=k)
  b = mask.shape[0]
  bad_mask = mask.at[b - 1].set(0.0)
  bad = dict(data, image=data["image"].at[b - 1].set(jnp.nan)
             .at[0, 0, 0, 0].set(jnp.inf))
  want = _common.flat(fns["dot"](params, data, bad_mask.at[0].set(0.0)))
  for k in SAFE:
    if k in fns:
      got = _common.flat(fns[k](params, bad, bad_mask))
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg=k)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--width", type=int, default=192)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--variants", default="where,dot,dot_where,dot_nan0,"
                  "dot_cond,cond_id,dot_loop,loop_where")
  args = ap.parse_args()
  params, loss_fn, data = setting(args.width, args.batch)
  mask = jnp.ones((args.batch,), jnp.float32)
  names = args.variants.split(",")
  fns = {k: step(loss_fn, k) for k in names}
  check(fns, params, data, mask)
  fns["nonprivate"] = jax.jit(_common.nonprivate_sum(loss_fn))
  for f in fns.values():
    jax.block_until_ready(f(params, data, mask))
  times = _common.interleaved_times(
      {k: functools.partial(f, params, data, mask) for k, f in fns.items()},
      args.reps)
  n = sum(x.size for x in jax.tree.leaves(params))
  base = times["nonprivate"]
  print(f"ViT width {args.width} x4, 64 tokens, {n / 1e6:.2f}M params, "
        f"batch {args.batch}, reps {args.reps}")
  print("| variant | NaN-safe | median time / non-private | median of per-rep "
        "ratios | temp MiB (XLA) |")
  print("|---|---|---|---|---|")
  for k in ["nonprivate"] + names:
    safe = "-" if k == "nonprivate" else ("yes" if k in SAFE else "NO")
    per_rep = statistics.median(t / b for t, b in zip(times[k], base))
    temp = fns[k].lower(params, data, mask).compile().memory_analysis()
    print(f"| {k} | {safe} | "
          f"{statistics.median(times[k]) / statistics.median(base):.2f}x | "
          f"{per_rep:.2f}x | {temp.temp_size_in_bytes / 2**20:.0f} |")

if __name__ == "__main__":
  main()
