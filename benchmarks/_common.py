"""What the benchmarks share: the model settings, the non-private floor,
interleaved timing, XLA's memory figure.

Import it as ``from benchmarks import _common`` (run the scripts from the
repository root with ``PYTHONPATH=.``).
"""

import time
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models import captioner
from dpjax.models import vit
from dpjax.train import step as step_lib

C = 1.0  # clip norm; irrelevant to speed.


def vit_setting(cfg: dict, image: int, dtype=jnp.float32):
  """(float32 params, per-example loss, batch_fn) of a ViT computing in
  `dtype` (the same params for every dtype): the CE of a linear head on
  mean-pooled tokens; `batch_fn(b)` draws b random images and labels."""
  model = vit.ViT(**cfg, dtype=dtype)
  key = jax.random.PRNGKey(0)
  params = model.init(key, jnp.zeros((1, image, image, 3)))["params"]
  head = jax.random.normal(key, (cfg["width"], 10)) * 0.02

  def loss_fn(p, ex):  # Linear-probe style CE on mean-pooled tokens.
    tok = model.apply({"params": p}, ex["image"][None])
    logits = jnp.mean(tok, axis=1) @ head
    return -jax.nn.log_softmax(logits)[0, ex["label"]]

  def batch_fn(b):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    return {"image": jax.random.normal(k1, (b, image, image, 3)),
            "label": jax.random.randint(k2, (b,), 0, 10)}

  return params, loss_fn, batch_fn


def cap_setting(cfg: dict, image: int, length: int, dtype=jnp.float32):
  """As `vit_setting`, for a DP-Cap captioner (caption loss)."""
  model = captioner.Captioner(**cfg, dtype=dtype)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, image, image, 3)),
                      jnp.zeros((1, length), jnp.int32))["params"]

  def loss_fn(p, ex):
    logits = model.apply({"params": p}, ex["image"][None], ex["tokens"][None])
    return captioner.caption_loss(logits, ex["tokens"][None, 1:])[0]

  def batch_fn(b):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    vocab = cfg["decoder"]["vocab_size"]
    return {"image": jax.random.normal(k1, (b, image, image, 3)),
            "tokens": jax.random.randint(k2, (b, length), 1, vocab)}

  return params, loss_fn, batch_fn


def nonprivate_sum(loss_fn: Callable) -> Callable:
  """``fn(params, batch, mask=None) -> gradient sum`` over real rows: the
  non-private floor, dpjax's own (``train.step.nonprivate_sum_fn``: one
  batched backward of sum_i loss_i)."""
  inner = step_lib.nonprivate_sum_fn(loss_fn)

  def fn(params, batch, mask=None):
    if mask is None:
      n = jax.tree.leaves(batch)[0].shape[0]
      mask = jnp.ones((n,), jnp.float32)
    return inner(params, batch, mask)[0]

  return fn


def peak_bytes(compiled) -> float:
  """XLA's buffer assignment of a compiled function: arguments + outputs +
  temporaries - aliases (the one peak figure a CPU run has)."""
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes +
               m.temp_size_in_bytes - m.alias_size_in_bytes)


def interleaved_times(calls: dict[Hashable, Callable[[], Any]],
                      reps: int) -> dict[Hashable, list[float]]:
  """Seconds of each call per rep, run INTERLEAVED (rep r runs every call
  once, back to back), so ratios share the machine's load."""
  times = {k: [] for k in calls}
  for _ in range(reps):
    for k, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[k].append(time.perf_counter() - t0)
  return times


def flat(tree) -> np.ndarray:
  """All leaves of `tree`, raveled into one float64 vector."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])
