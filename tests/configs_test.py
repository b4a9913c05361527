"""Every config file and preset builds, names a recipe, and declares its keys."""

import importlib
import pathlib

import pytest

from dpjax import recipes

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] /
                                  "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  module = importlib.import_module(f"configs.{name}")
  assert f"configs/{name}.py" in module.__doc__  # the run command.
  # The papers' recipes have :paper (the default) and :tiny; a config may
  # declare its own PRESETS.
  for preset in (None,) + getattr(module, "PRESETS", ("paper", "tiny")):
    config = module.get_config(preset)
    assert config.recipe in recipes.RECIPES
    for block in ("privacy", "train", "mesh"):
      assert block in config
    assert config.train.batch_size > 0 and config.train.steps >= 0


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_preset_is_an_error(name):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError, match="preset|unknown"):
    module.get_config("no_such_preset")


def test_unknown_recipe_lists_the_valid_ones():
  with pytest.raises(ValueError, match="dpcap"):
    recipes.get("no_such_recipe")
