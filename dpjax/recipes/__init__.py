"""Recipes: one module per paper, each with `build(config) -> train.task.Task`.

Lookup is a plain dict of module paths, imported on demand so that one
recipe's dependencies never load for another.
"""

import importlib
from types import ModuleType

RECIPES = {
    "dpcap": "dpjax.recipes.dpcap",
    "vip": "dpjax.recipes.vip",
    "dp_continual": "dpjax.recipes.continual",
    "dpfedemb": "dpjax.recipes.fedemb",
}


def get(name: str) -> ModuleType:
  """The recipe module named by `config.recipe`."""
  if name not in RECIPES:
    raise ValueError(f"config.recipe={name!r} is unknown; valid recipes: "
                     f"{sorted(RECIPES)}")
  return importlib.import_module(RECIPES[name])
