r"""DP overhead: non-private vs vmap-clipped vs ghost-clipped gradient step.

For each (model, batch) setting this builds three jitted functions of
(params, batch, mask) -> gradient sum over the batch:
  nonprivate  grad of sum_i loss_i (one batched backward;
              train.step.nonprivate_sum_fn),
  vmap        privacy.clipped_grad(method="vmap")  (per-example grads),
  ghost       privacy.clipped_grad(method="auto")  (ghost norms+book-keeping),
and times them INTERLEAVED in one process (rep r runs all three back to back)
so the ratios are measured under the same machine load. Peak memory is XLA's
buffer assignment of each compiled function (arguments + outputs + temporaries
- aliased; `compiled.memory_analysis()`), the one peak figure available on CPU
for a single function; on GPU/TPU `device.memory_stats()` peaks are printed too.

Run from the repository root (by hand, not in the test suite):
  PYTHONPATH=. .venv/bin/python benchmarks/dp_overhead.py    # all settings
  PYTHONPATH=. .venv/bin/python benchmarks/dp_overhead.py \
      --models vit_tiny --batches 64
  ... --methods nonprivate,ghost  --reps 7 --markdown
"""

import argparse
import datetime
import functools
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from dpjax import privacy
from dpjax.models import captioner
from dpjax.models import vit


def settings():
  """name -> (params, loss_fn, batch_fn, description)."""
  tiny_cap = captioner.captioner_config("tiny")
  # "Paper-shaped, scaled": the paper's token counts and layer aspect ratios
  # (224px / patch 16 = 196 patches; DP-Cap: no biases, CLS, 40 tokens, a
  # BERT-sized vocabulary) at ViT-Ti width and 2 blocks so it runs on a CPU.
  paper_vit = vit.vit_config("Ti/16", depth=2)
  paper_cap = captioner.captioner_config("Ti/16")
  paper_cap["encoder"]["depth"] = 2
  paper_cap["decoder"].update(depth=1, vocab_size=8192)
  return {
      "vit_tiny": lambda: _common.vit_setting(vit.vit_config("mu/4"), 32) + (
          "ViT mu/4 (96x4, 32px, 64 tokens)",),
      "vit_paper": lambda: _common.vit_setting(paper_vit, 224) + (
          "ViT Ti/16 x2 blocks (192, 224px, 196 tokens)",),
      "cap_tiny": lambda: _common.cap_setting(tiny_cap, 32, 32) + (
          "DP-Cap tiny (enc 96x4, dec 96x2, V=512, 32 tok)",),
      "cap_paper": lambda: _common.cap_setting(paper_cap, 224, 40) + (
          "DP-Cap Ti/16 x2 enc + 192x1 dec, V=8192, 40 tok, 224px",),
  }


def build(method, loss_fn, compute_dtype=None):
  if method == "nonprivate":
    return jax.jit(_common.nonprivate_sum(loss_fn))
  kw = {} if method == "vmap" else dict(method="auto")
  if compute_dtype is not None:
    kw["compute_dtype"] = compute_dtype
  return jax.jit(privacy.clipped_grad(loss_fn, _common.C, **kw))


def run_setting(name, batch_size, methods, reps):
  params, loss_fn, batch_fn, desc = settings()[name]()
  batch = batch_fn(batch_size)
  mask = jnp.ones((batch_size,), jnp.float32)
  fns, mem = {}, {}
  for m in methods:
    jitted = build(m, loss_fn)
    compiled = jitted.lower(params, batch, mask).compile()
    mem[m] = _common.peak_bytes(compiled)
    fns[m] = compiled
    jax.block_until_ready(compiled(params, batch, mask))  # warm-up
  times = _common.interleaved_times(
      {m: functools.partial(fns[m], params, batch, mask) for m in methods},
      reps)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  rows = []
  base_t = statistics.median(times["nonprivate"]) if "nonprivate" in times else None
  base_m = mem.get("nonprivate")
  for m in methods:
    t = statistics.median(times[m])
    rows.append(dict(model=name, desc=desc, params=n_params, batch=batch_size,
                     method=m, median_s=t, ex_per_s=batch_size / t,
                     time_ratio=t / base_t if base_t else float("nan"),
                     peak_mb=mem[m] / 2**20,
                     mem_ratio=mem[m] / base_m if base_m else float("nan")))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="vit_tiny,vit_paper,cap_tiny,cap_paper")
  ap.add_argument("--batches", default="64,256")
  ap.add_argument("--methods", default="nonprivate,vmap,ghost")
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  methods = args.methods.split(",")
  print(f"# {datetime.datetime.now().isoformat(timespec='minutes')} "
        f"jax {jax.__version__} backend {jax.default_backend()} "
        f"devices {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"{platform.machine()} reps={args.reps}")
  print("| model | batch | method | median step (s) | examples/s | "
        "time / non-private | peak MiB | mem / non-private |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    for b in [int(x) for x in args.batches.split(",")]:
      for r in run_setting(name, b, methods, args.reps):
        print(f"| {r['model']} | {r['batch']} | {r['method']} | "
              f"{r['median_s']:.3f} | {r['ex_per_s']:.1f} | "
              f"{r['time_ratio']:.2f}x | {r['peak_mb']:.0f} | "
              f"{r['mem_ratio']:.2f}x |", flush=True)


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
