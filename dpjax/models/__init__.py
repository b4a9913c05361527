"""dpjax Flax Linen models: one architecture per file, plain-dict lookup.

    from dpjax import models
    cls = models.get_model("mae")                 # -> mae.MAE
    cfg = models.get_config("mae")("tiny")        # -> MAE kwargs
    model = cls(**cfg)

Models know nothing of privacy; every module treats examples independently
(no BatchNorm, no cross-example ops) so per-example gradients via
`jax.vmap(jax.grad(...))` over `model.apply(params, x[None])` are exact.
"""

from typing import Any, Callable

from dpjax.models import captioner
from dpjax.models import classifier
from dpjax.models import embedder
from dpjax.models import mae
from dpjax.models import text_decoder
from dpjax.models import vit

MODELS = {
    "vit": vit.ViT,
    "captioner": captioner.Captioner,
    "mae": mae.MAE,
    "classifier": classifier.Classifier,
    "embedder": embedder.Embedder,
    "embedder_head": embedder.Head,
    "text_decoder": text_decoder.TextDecoder,
}

# variant string (+ kwargs) -> constructor kwargs, e.g. CONFIGS["vit"]("B/16").
CONFIGS = {
    "vit": vit.vit_config,
    "captioner": captioner.captioner_config,
    "mae": mae.mae_config,
    "classifier": classifier.classifier_config,
    "embedder": embedder.embedder_config,
}


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
  if name not in table:
    raise ValueError(f"unknown {what} {name!r}; valid: {sorted(table)}")
  return table[name]


def get_model(name: str) -> type:
  """Returns the Flax module class registered under `name`."""
  return _lookup(MODELS, name, "model")


def get_config(name: str) -> Callable[..., dict]:
  """Returns the `<name>_config(variant, ...)` function for model `name`."""
  return _lookup(CONFIGS, name, "model config")
