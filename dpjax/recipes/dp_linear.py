"""DP linear classification on embedded data: the minimal recipe.

Multinomial logistic regression on scikit-learn's handwritten digits (1,797
8x8 images, shipped with scikit-learn: nothing is downloaded), trained with
DP-SGD by the one loop. Everything a recipe supplies is here: the data
(a random-access source of records), the per-example loss, the phases and
the evaluators' functions and data. Privacy (Poisson sampling, clipping,
noise, accounting), checkpoints, logs and evaluation scheduling are the
loop's.

Split: a fixed public permutation of the 1,797 images; the first
`data.num_train` are the private training set, the rest the held-out
evaluation set. Pixels are scaled by the fixed 1/16 (the data's public
range), never by statistics of the private set.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import evaluate
from dpjax.train import optim
from dpjax.train import task as task_lib

NUM_CLASSES = 10
_SPLIT_SEED = 0  # The public permutation that splits train / held-out.


class DigitsSource:
  """Records {"image": float32[64] in [0, 1], "label": int} of one split."""

  def __init__(self, split: str, num_train: int):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    if not 0 < num_train < len(digits.target):
      raise ValueError(f"config.data.num_train={num_train} is invalid: use "
                       f"1..{len(digits.target) - 1}")
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(digits.target))
    rows = order[:num_train] if split == "train" else order[num_train:]
    self.images = (digits.data[rows] / 16.0).astype(np.float32)
    self.labels = digits.target[rows].astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}


def logits(params, images: jax.Array) -> jax.Array:
  """[B, 64] -> [B, 10]."""
  return images @ params["w"] + params["b"]


def loss_fn(params, example) -> jax.Array:
  """Cross-entropy of ONE example (no batch axis): what is clipped."""
  z = logits(params, example["image"][None])[0]
  return optax.softmax_cross_entropy_with_integer_labels(z, example["label"])


def build(config: ml_collections.ConfigDict) -> task_lib.Task:
  """The DP linear classification task for `train.loop.run`."""
  d, t = config.data, config.train
  train = DigitsSource("train", d.num_train)
  phase = task_lib.Phase(
      name="dp" if config.privacy.enabled else "train",
      private=bool(config.privacy.enabled), source=train, transforms=(),
      loss_fn=loss_fn, steps=t.steps, batch_size=t.batch_size,
      optimizer=optim.optimizer_from_config(t))

  def init_params(rng):
    del rng  # Zero init: the optimum does not depend on a random start.
    dim = train.images.shape[1]
    return {"w": jnp.zeros((dim, NUM_CLASSES)), "b": jnp.zeros(NUM_CLASSES)}

  def heldout():
    test = DigitsSource("test", d.num_train)
    return {"image": test.images, "label": test.labels}

  context = evaluate.Context("dp_linear", fns={"logits": logits},
                             data={"test": heldout}, seed=config.seed)
  return task_lib.Task(init_params=init_params, phases=[phase],
                       evaluators=evaluate.from_config(config.evals, context))
