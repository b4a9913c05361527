r"""bfloat16 compute with float32 norms and sums: clipped-sum error and speed.

`train.dtype="bfloat16"` runs a model's matmuls and activations in bfloat16
while its params stay float32, so the per-example gradients (hence the norms
and clip factors), the clipped sum and the noise are float32. For each model
of `peers.py` and each clipping method (vmap, auto), the same params and batch
go through float32 and bfloat16 compute; in one process:
  rel. error      ||S_bf16 - S_f32|| / ||S_f32|| of the clipped sum S
  error / noise   ||S_bf16 - S_f32|| / (sigma C sqrt(d)) at sigma = 1: the
                  bfloat16 error as a fraction of the norm of the Gaussian
                  noise the DP step adds anyway (d = number of params)
  flipped         examples whose clip factor min(1, C / norm) moves by more
                  than 1% (vmap only, from the per-example gradients)
  time bf16/f32   per-rep median of the ratio, runs interleaved (also for the
                  non-private step)
On a CPU bfloat16 matmuls are emulated, so the time ratio says nothing about an
accelerator; the error does.

Run from the repository root (by hand, a few minutes on 2 CPU cores):
  PYTHONPATH=. .venv/bin/python benchmarks/bf16.py
  PYTHONPATH=. .venv/bin/python benchmarks/bf16.py --models vit_narrow --reps 3
"""

import argparse
import datetime
import functools
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
from benchmarks import peers
from dpjax import privacy

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
BATCHES = {"vit_narrow": 64, "vit_b16": 8, "captioner": 64}


def _fn(method: str, loss_fn):
  if method == "nonprivate":
    return _common.nonprivate_sum(loss_fn)
  fn = privacy.clipped_grad(loss_fn, _common.C, method=method)
  return lambda p, b: fn(p, b)[0]


def _clip_factors(loss_fn, params, data) -> np.ndarray:
  g = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(params, data)
  norms = np.asarray(jax.vmap(optax.tree.norm)(g), np.float64)
  return np.minimum(1.0, _common.C / norms)


def run_model(model: str, reps: int) -> list[dict]:
  make, _, desc = peers.MODELS[model]
  batch = BATCHES[model]
  built = {k: make(batch, dtype=d) for k, d in DTYPES.items()}
  params, _, data = built["f32"]  # The same params and batch for both.
  fns, sums = {}, {}
  for method in ("nonprivate", "vmap", "auto"):
    for k, (_, loss_fn, _) in built.items():
      fns[method, k] = jax.jit(_fn(method, loss_fn)).lower(params,
                                                           data).compile()
      sums[method, k] = _common.flat(jax.block_until_ready(
          fns[method, k](params, data)))
  factors = {k: _clip_factors(built[k][1], params, data) for k in DTYPES}
  flipped = int(np.sum(np.abs(factors["bf16"] - factors["f32"])
                       > 0.01 * factors["f32"]))
  times = _common.interleaved_times(
      {key: functools.partial(f, params, data) for key, f in fns.items()},
      reps)
  d = sums["vmap", "f32"].size
  rows = []
  for method in ("nonprivate", "vmap", "auto"):
    ref, low = sums[method, "f32"], sums[method, "bf16"]
    err = float(np.linalg.norm(low - ref))
    rows.append(dict(
        model=model, desc=desc, batch=batch, params=d, method=method,
        rel_error=err / float(np.linalg.norm(ref)),
        error_over_noise=(err / (_common.C * np.sqrt(d))
                          if method != "nonprivate" else float("nan")),
        flipped=flipped if method == "vmap" else None,
        time_ratio=statistics.median(
            b / f for b, f in zip(times[method, "bf16"],
                                  times[method, "f32"]))))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default=",".join(BATCHES))
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  print(f"# {datetime.datetime.now().isoformat(timespec='minutes')} "
        f"jax {jax.__version__} backend {jax.default_backend()} "
        f"{platform.machine()} reps={args.reps}")
  print("| model | batch | params | method | rel. error of the sum | "
        "error / noise norm (sigma=1) | clip factors moved >1% | "
        "time bf16 / f32 |")
  print("|---|---|---|---|---|---|---|---|")
  for model in args.models.split(","):
    for r in run_model(model, args.reps):
      noise = ("-" if r["method"] == "nonprivate"
               else f"{r['error_over_noise']:.2e}")
      flipped = "-" if r["flipped"] is None else f"{r['flipped']}/{r['batch']}"
      print(f"| {r['model']} | {r['batch']} | {r['params']:,} | "
            f"{r['method']} | {r['rel_error']:.2e} | {noise} | {flipped} | "
            f"{r['time_ratio']:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
