"""Tests for the dpjax.models registry (dpjax/models/__init__.py)."""

import jax
import jax.numpy as jnp
import pytest

from dpjax import models


def test_every_config_builds_a_model():
  for name in models.CONFIGS:
    args = ("tiny", 3) if name == "classifier" else (
        "mu/4" if name == "vit" else "tiny",)
    model = models.get_model(name)(**models.get_config(name)(*args))
    assert isinstance(model, models.get_model(name))
  images = jnp.zeros((1, 32, 32, 3))
  mae = models.get_model("mae")(**models.get_config("mae")("tiny"))
  shapes = jax.eval_shape(mae.init, jax.random.PRNGKey(0), images,
                          jax.random.split(jax.random.PRNGKey(1), 1))
  assert "encoder" in shapes["params"]


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="captioner"):
    models.get_model("resnet")
  with pytest.raises(ValueError, match="mae"):
    models.get_config("bogus")


def test_params_live_only_in_ghost_clippable_layers():
  """Every param is a Dense/Conv kernel or bias, Embed table or LN scale."""
  images = jnp.zeros((1, 32, 32, 3))
  tokens = jnp.zeros((1, 8), jnp.int32)
  keys = jax.random.split(jax.random.PRNGKey(1), 1)
  built = {
      "vit": (models.get_config("vit")("mu/4", use_cls_token=True,
                                       pos_embedding="learn"), (images,)),
      "captioner": (models.get_config("captioner")("tiny"), (images, tokens)),
      "mae": (models.get_config("mae")("tiny"), (images, keys)),
      "classifier": (models.get_config("classifier")("tiny", 3), (images,)),
      "embedder": (models.get_config("embedder")("tiny"), (images,)),
  }
  for name, (cfg, args) in built.items():
    model = models.get_model(name)(**cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    leaf_names = {path[-1].key for path, _ in paths}
    assert leaf_names <= {"kernel", "bias", "embedding", "scale"}, (
        name, leaf_names)
