r"""DP linear classification on scikit-learn's digits: the minimal recipe.

Logistic regression (64 pixels -> 10 classes) with DP-SGD on the 1,500
private training images, epsilon 2 at delta N^-1.1; held-out accuracy on the
other 297 (`dpjax/recipes/dp_linear.py`). Seconds on a CPU:

  python -m dpjax.main --config=configs/dp_linear.py --workdir=runs/dp_linear

It is the template for a new recipe (docs/extending.md, "Adding a recipe").
"""

import ml_collections

from configs import common

PRESETS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` = "tiny" (the only preset, also the default)."""
  if arg not in (None, "") + PRESETS:
    raise ValueError(f"configs/dp_linear.py:{arg}: unknown preset; use :tiny")
  c = common.base_config("dp_linear")
  c.data.num_train = 1500  # private training images (the rest are held out).
  c.privacy.update(target_epsilon=2.0, l2_clip_norm=1.0)
  c.train.update(
      steps=150, batch_size=128, microbatch_size=128, optimizer="sgd",
      learning_rate=2.0, weight_decay=0.0, log_every=25, checkpoint_every=50)
  c.evals = ml_collections.ConfigDict(dict(
      # Top-1/top-5/CE of the model's own logits on the held-out images,
      # every 50 steps and at the end.
      accuracy=dict(type="classifier_accuracy", log_steps=50, pred="logits",
                    data="test"),
  ))
  return c
