"""Recipes: one module per paper, each with `build(config) -> train.task.Task`.

Lookup is a plain dict of module paths, imported on demand so that one
recipe's dependencies never load for another. `run(config, workdir)` builds
the config's task and trains it with the one loop (`train.loop.run`); it is
what `dpjax.main`, the notebooks and the tests call.

Adding a recipe: a config file in configs/, a module here with `build`, one
line in `RECIPES`, and a test, all under one name: configs/<name>.py sets
`config.recipe = "<name>"`, run by dpjax/recipes/<name>.py (see docs/extending.md,
"Adding a recipe").
"""

import importlib
from types import ModuleType
from typing import Any

from dpjax import errors

RECIPES = {
    "dpcap": "dpjax.recipes.dpcap",
    "vip": "dpjax.recipes.vip",
    "dp_continual": "dpjax.recipes.dp_continual",
    "dpfedemb": "dpjax.recipes.dpfedemb",
    "dp_linear": "dpjax.recipes.dp_linear",
}


def get(name: str) -> ModuleType:
  """The recipe module named by `config.recipe`."""
  if name not in RECIPES:
    raise errors.config_error("recipe", name,
                              f"valid recipes: {sorted(RECIPES)}")
  return importlib.import_module(RECIPES[name])


def build(config) -> Any:
  """The `train.task.Task` of `config.recipe`."""
  return get(config.recipe).build(config)


def run(config, workdir: str) -> dict[str, Any]:
  """Builds `config`'s task and trains (or resumes, or evaluates) it in
  `workdir`; returns the run's public results (see `train.loop.run`)."""
  from dpjax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.run(build(config), config, workdir)
