"""Evaluators: small classes built from plain arrays + model functions.

Each evaluator is constructed with data arrays and the model functions it
needs (it knows nothing of specific models) and exposes
``run(params) -> dict[str, float]`` of aggregate metrics on held-out,
non-private data, named "<prefix>/<metric>" (e.g. "linear_probe/shape_acc").
Recipes pick them by name through the plain dict ``EVALUATORS`` / ``get``.
"""

from dpjax.evaluate import caption_likelihood
from dpjax.evaluate import few_shot
from dpjax.evaluate import fine_tune
from dpjax.evaluate import linear_probe
from dpjax.evaluate import retrieval

EVALUATORS = {
    "linear_probe": linear_probe.LinearProbe,
    "few_shot": few_shot.FewShot,
    "fine_tune": fine_tune.FineTune,
    "retrieval": retrieval.Retrieval,
    "heldout_caption_loss": caption_likelihood.HeldOutCaptionLoss,
    "zero_shot": caption_likelihood.ZeroShot,
    "aro": caption_likelihood.AROScore,
    "captioning": caption_likelihood.Captioning,
    "token_accuracy": caption_likelihood.TokenAccuracy,
}


def get(name: str) -> type:
  """Evaluator class registered under ``name``.

  Raises:
    ValueError: unknown name; the message lists the valid names.
  """
  if name not in EVALUATORS:
    raise ValueError(f"Unknown evaluator {name!r}; valid names: "
                     f"{sorted(EVALUATORS)}.")
  return EVALUATORS[name]
