"""Every config file and preset builds, names a recipe, and declares its keys."""

import importlib
import pathlib

import pytest

from configs import common
from dpjax import recipes

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] /
                                  "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
  module = importlib.import_module(f"configs.{name}")
  assert f"configs/{name}.py" in module.__doc__  # the run command.
  # The papers' recipes have :paper (the default), :tiny and :paper,smoke;
  # a config may declare its own PRESETS.
  for preset in (None,) + getattr(module, "PRESETS",
                                  ("paper", "tiny", "paper,smoke")):
    config = module.get_config(preset)
    # Config file = recipe key = recipe module name.
    assert config.recipe == name
    assert recipes.RECIPES[name] == f"dpjax.recipes.{name}"
    # Built on common.base_config: every shared key is there.
    assert _paths(common.base_config(name)) <= _paths(config)
    assert config.train.batch_size > 0 and config.train.steps >= 0


def _paths(config, prefix: str = "") -> set[str]:
  """Dotted paths of every field of `config` (blocks and leaves)."""
  out = set()
  for key, value in config.items():
    out.add(prefix + key)
    if hasattr(value, "items"):
      out |= _paths(value, f"{prefix}{key}.")
  return out


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_preset_is_an_error(name):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ValueError, match="preset|unknown"):
    module.get_config("no_such_preset")


PAPER_CONFIGS = [n for n in CONFIGS if not hasattr(
    importlib.import_module(f"configs.{n}"), "PRESETS")]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_smoke_modifies_paper_only(name):
  module = importlib.import_module(f"configs.{name}")
  assert "paper,smoke" in module.__doc__  # documented, with its command.
  smoke, paper = module.get_config("paper,smoke"), module.get_config("paper")
  assert smoke.model == paper.model and smoke.train.dtype == paper.train.dtype
  assert smoke.train.steps == 1 and not any(
      v.startswith(("tfds:", "arrayrecord:", "folder:"))
      for v in (smoke.data.source, smoke.data.eval_source))
  with pytest.raises(ValueError, match="smoke modifies :paper only"):
    module.get_config("tiny,smoke")
  with pytest.raises(ValueError, match="modifiers"):
    module.get_config("paper,no_such_modifier")


def test_unknown_recipe_lists_the_valid_ones():
  with pytest.raises(ValueError, match="dpcap"):
    recipes.get("no_such_recipe")
