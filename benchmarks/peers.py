r"""The DP step of dpjax against the other JAX ways to write it, in one run.

For each model, the same params and batch go through jitted functions of
(params, batch) -> gradient sum:
  nonprivate   jax.grad of sum_i loss_i (one batched backward; the floor;
               train.step.nonprivate_sum_fn)
  plain_vmap   vmap(grad) -> per-example norms -> tensordot(min(1, C/n), g)
               (the textbook JAX DP-SGD sum; NOT NaN-safe)
  optax        optax.contrib.differentially_private_aggregate(C, 0, key) on
               vmap(grad), times B (its mean -> a sum; noise std 0, so the
               draw is there but adds 0)
  jax_privacy  jax_privacy.clipped_grad(..., keep_batch_dim=False) (NaN-safe
               by default), when the package is installed (`pip install
               -e .[bench]`), else reported "not installed"
  dpjax_vmap   dpjax.privacy.clipped_grad(method="vmap")
  dpjax_auto   dpjax.privacy.clipped_grad(method="auto")  (ghost norms +
               book-keeping; dpjax's default since these runs)
Before timing, every DP variant's clipped sum is checked against plain_vmap
(allclose; the run stops if one differs). Then the variants are timed
INTERLEAVED (rep r runs each once, back to back), so ratios share the
machine's load: "time / non-private" (and "/ plain_vmap") is the median
over reps of the per-rep ratio. Memory is XLA's buffer assignment of each
compiled function (`compiled.memory_analysis()`: arguments + outputs +
temporaries - aliases).

Models (clip norm C = 1; the CE loss of a linear head on mean-pooled tokens):
  vit_narrow  ViT width 192, 4 blocks, 3 heads, 32px / patch 4 = 64 tokens,
              1.8M params, batch 256
  vit_b16     ViT-B/16 shape (width 768, 12 heads, MLP 3072, 224px, 196
              patches + CLS = 197 tokens) at 2 blocks, batch 16
  captioner   dpjax.models.captioner_config("tiny") (DP-Cap: ViT encoder +
              causal decoder, 32px, 32 tokens), batch 128

Run from the repository root (by hand; the default run takes 5-10 minutes on
a 2-core CPU). With jax_privacy: a venv with `pip install -e '.[bench]'`;
without it (its row then says "not installed"), any dpjax venv:
  .venv-bench/bin/python benchmarks/peers.py
  PYTHONPATH=. .venv/bin/python benchmarks/peers.py \
      --models vit_narrow --reps 5 --variants nonprivate,plain_vmap,dpjax_vmap
"""

import argparse
import datetime
import functools
import platform
import statistics
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from dpjax import privacy
from dpjax.models import captioner
from dpjax.models import vit

C = _common.C
VARIANTS = ("nonprivate", "plain_vmap", "optax", "jax_privacy", "dpjax_vmap",
            "dpjax_auto")


def _vit(cfg: dict, image: int, batch: int, dtype=jnp.float32):
  """The shared ViT setting (CE of a linear head on mean-pooled tokens)
  with a batch of `batch` random images."""
  params, loss_fn, batch_fn = _common.vit_setting(cfg, image, dtype)
  return params, loss_fn, batch_fn(batch)


def _captioner(batch: int, length: int = 32, image: int = 32,
               dtype=jnp.float32):
  """DP-Cap tiny, the same setting as dp_overhead.py's cap_tiny."""
  params, loss_fn, batch_fn = _common.cap_setting(
      captioner.captioner_config("tiny"), image, length, dtype)
  return params, loss_fn, batch_fn(batch)


# name -> (make(batch, dtype=float32) -> (params, loss_fn, batch), default
# batch, description). `dtype` is the compute dtype; params are float32.
MODELS = {
    "vit_narrow": (lambda b, dtype=jnp.float32: _vit(
        dict(width=192, depth=4, mlp_dim=768, num_heads=3, patch_size=4), 32,
        b, dtype), 256, "ViT 192 x4 blocks, 64 tokens"),
    "vit_b16": (lambda b, dtype=jnp.float32: _vit(
        vit.vit_config("B/16", depth=2, use_cls_token=True), 224, b, dtype),
                16, "ViT-B/16 shape x2 blocks, 197 tokens"),
    "captioner": (lambda b, dtype=jnp.float32: _captioner(b, dtype=dtype), 128,
                  "DP-Cap tiny (32px, 32 tokens)"),
}


def _jax_privacy():
  try:
    import jax_privacy  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return jax_privacy


def build(name: str, loss_fn: Callable) -> Optional[Callable]:
  """(params, batch) -> gradient sum for one variant; None if unavailable."""
  per_example = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
  if name == "nonprivate":
    return _common.nonprivate_sum(loss_fn)
  if name == "plain_vmap":
    def plain(p, b):
      g = per_example(p, b)
      norms = jax.vmap(optax.tree.norm)(g)
      f = jnp.minimum(1.0, C / norms)
      return jax.tree.map(lambda x: jnp.tensordot(f, x, axes=1), g)
    return plain
  if name == "optax":
    agg = optax.contrib.differentially_private_aggregate(
        C, 0.0, jax.random.key(0))

    def opt(p, b):
      g = per_example(p, b)
      mean, _ = agg.update(g, agg.init(p))
      n = jax.tree.leaves(b)[0].shape[0]
      return jax.tree.map(lambda x: x * n, mean)
    return opt
  if name == "jax_privacy":
    jp = _jax_privacy()
    if jp is None:
      return None
    return jp.clipped_grad(loss_fn, l2_clip_norm=C, batch_argnums=1,
                           keep_batch_dim=False)
  method = {"dpjax_vmap": "vmap", "dpjax_auto": "auto"}[name]
  fn = privacy.clipped_grad(loss_fn, C, method=method)
  return lambda p, b: fn(p, b)[0]


def run_model(model: str, batch: Optional[int], variants: list[str],
              reps: int) -> list[dict]:
  make, default_batch, desc = MODELS[model]
  batch = batch or default_batch
  params, loss_fn, data = make(batch)
  fns, mem, rows = {}, {}, []
  for v in variants:
    fn = build(v, loss_fn)
    if fn is None:
      rows.append(dict(variant=v, note="not installed"))
      continue
    compiled = jax.jit(fn).lower(params, data).compile()
    mem[v] = _common.peak_bytes(compiled)
    fns[v] = compiled
  ref = (_common.flat(fns["plain_vmap"](params, data)) if "plain_vmap" in fns
         else None)
  for v, f in fns.items():
    out = _common.flat(jax.block_until_ready(f(params, data)))  # + warm-up.
    if ref is not None and v != "nonprivate":
      scale = float(np.max(np.abs(ref)))
      if not np.allclose(out, ref, rtol=2e-4, atol=2e-5 * scale):
        err = float(np.max(np.abs(out - ref)))
        raise SystemExit(f"{model}/{v}: clipped sum differs from plain_vmap "
                         f"(max abs diff {err:.3g}, scale {scale:.3g})")
  times = _common.interleaved_times(
      {v: functools.partial(f, params, data) for v, f in fns.items()}, reps)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  def ratio(v, base):
    if base not in times:
      return float("nan")
    return statistics.median(t / b for t, b in zip(times[v], times[base]))

  for v in fns:
    rows.append(dict(variant=v, median_s=statistics.median(times[v]),
                     ratio=ratio(v, "nonprivate"),
                     vs_plain=ratio(v, "plain_vmap"), peak_mib=mem[v] / 2**20,
                     mem_ratio=mem[v] / mem["nonprivate"]
                     if "nonprivate" in mem else float("nan")))
  order = {v: i for i, v in enumerate(variants)}
  rows.sort(key=lambda r: order[r["variant"]])
  for r in rows:
    r.update(model=model, desc=desc, batch=batch, params=n_params)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=0,
                  help="override every model's batch size (0: defaults)")
  args = ap.parse_args()
  jp = _jax_privacy()
  print(f"# {datetime.datetime.now().isoformat(timespec='minutes')} jax "
        f"{jax.__version__} optax {optax.__version__} jax_privacy "
        f"{getattr(jp, '__version__', 'not installed')} backend "
        f"{jax.default_backend()} {platform.machine()} reps={args.reps}")
  print("| model | batch | params | variant | median step (s) | "
        "time / non-private | time / plain_vmap | peak MiB | "
        "mem / non-private |")
  print("|---|---|---|---|---|---|---|---|---|")
  for model in args.models.split(","):
    for r in run_model(model, args.batch, args.variants.split(","),
                       args.reps):
      head = (f"| {model} ({r['desc']}) | {r['batch']} | "
              f"{r['params'] / 1e6:.1f}M | {r['variant']} |")
      if "note" in r:
        print(f"{head} {r['note']} | | | | |", flush=True)
      else:
        print(f"{head} {r['median_s']:.3f} | {r['ratio']:.2f}x | "
              f"{r['vs_plain']:.2f}x | {r['peak_mib']:.0f} | "
              f"{r['mem_ratio']:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
