"""train.augmult = K: each sampled example is K augmented copies whose
per-example gradient is the MEAN over the copies, clipped once.

The privacy unit is unchanged (one example), so is the sensitivity C: the
mean of the copies' gradients is one example's gradient, clipped as one.
The copies' augmentations (and, via "rng", ViP's masks) come from the
example's secret per-example randomness.
"""

import dataclasses

import jax

from dpjax import errors
from dpjax.data import transforms as transforms_lib
from dpjax.train import task as task_lib


def mean_over_copies(loss_fn, k: int):
  """Per-example loss of an example whose fields are [k, ...] copies: the
  mean of `loss_fn` over them. An "rng" uint32[2] leaf (one per example,
  added by the pipeline) is split into k keys, one per copy."""

  def fn(params, example):
    copies = dict(example)
    if "rng" in copies:
      copies["rng"] = jax.random.split(copies["rng"], k)
    # Unrolled, not vmapped: each copy is one more application of the
    # model, which ghost clipping handles as shared parameters.
    losses = [loss_fn(params, jax.tree.map(lambda x, j=j: x[j], copies))
              for j in range(k)]
    return sum(losses) / k

  return fn


def apply(phase: task_lib.Phase, k: int) -> task_lib.Phase:
  """`phase` with K-copy augmentation (k > 1 and a private phase; others
  are returned as they are).

  Raises:
    ConfigError: the phase has its own batching or clipped sum (DP-FedEmb's
      users), where per-example copies do not apply.
  """
  if k <= 1 or not phase.private:
    return phase
  if phase.make_batches is not None or phase.clipped_sum_fn is not None:
    raise errors.config_error(
        "train.augmult", k, f"phase {phase.name!r} samples users, not "
        "examples: augmentation multiplicity applies to example-level "
        "phases only; set it to 1")
  return dataclasses.replace(
      phase, transforms=[transforms_lib.Augmult(phase.transforms, k)],
      loss_fn=mean_over_copies(phase.loss_fn, k))
