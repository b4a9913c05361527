r"""Cost of augmentation multiplicity: the clipped-sum step with K copies per
example (`train.augmult`), against K=1, for vmap and auto clipping.

Each example of the batch carries K images; the per-example loss is the mean
over them (`dpjax.train.augmult.mean_over_copies`). Times are interleaved
medians in one process (ratios only); peak memory is XLA's buffer assignment
of the compiled step (deterministic, load-independent).

Run from the repository root (by hand, not in the test suite):
  PYTHONPATH=. python benchmarks/augmult_cost.py    # vit_tiny, batch 32
  PYTHONPATH=. python benchmarks/augmult_cost.py --ks=1,4,16 --batch=32 --reps=5
"""

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp

from benchmarks import _common
from dpjax import privacy
from dpjax.models import vit
from dpjax.train import augmult


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ks", default="1,4,16")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--methods", default="vmap,auto")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  params, loss_fn, _ = _common.vit_setting(vit.vit_config("mu/4"), 32)
  ks = [int(k) for k in args.ks.split(",")]
  mask = jnp.ones((args.batch,))
  fns, mem = {}, {}
  for k in ks:
    key = jax.random.PRNGKey(k)
    batch = {"image": jax.random.normal(key, (args.batch, k, 32, 32, 3)),
             "label": jnp.zeros((args.batch, k), jnp.int32)}
    for method in args.methods.split(","):
      fn = jax.jit(privacy.clipped_grad(augmult.mean_over_copies(loss_fn, k),
                                        1.0, method=method))
      compiled = fn.lower(params, batch, mask).compile()
      mem[(k, method)] = _common.peak_bytes(compiled)
      jax.block_until_ready(fn(params, batch, mask))  # Warm.
      fns[(k, method)] = (fn, batch)
  times = _common.interleaved_times(
      {key: functools.partial(fn, params, batch, mask)
       for key, (fn, batch) in fns.items()}, args.reps)
  print(f"| K | method | median step (s) | time / K=1 | peak MiB (XLA) | "
        f"mem / K=1 |\n|---|---|---|---|---|---|")
  for (k, method) in fns:
    t = statistics.median(times[(k, method)])
    t1 = statistics.median(times[(ks[0], method)])
    print(f"| {k} | {method} | {t:.3f} | {t / t1:.2f}x | "
          f"{mem[(k, method)] / 2**20:.0f} | "
          f"{mem[(k, method)] / mem[(ks[0], method)]:.2f}x |")


if __name__ == "__main__":
  main()
