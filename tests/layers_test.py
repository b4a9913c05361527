"""Imports flow one way: main/plan -> recipes -> train -> data | models |
evaluate -> privacy (README, "Layout"). Every `import` in dpjax/ (lazy
ones inside functions included) is checked."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dpjax"
# Higher layers may import lower ones; a package imports only itself and
# lower layers (data, models and evaluate do not import each other).
LAYERS = {
    "main": 4, "plan": 4,
    "recipes": 3,
    "train": 2,
    "data": 1, "models": 1, "evaluate": 1,
    "privacy": 0, "private_files": 0, "": 0,  # "": the package's __init__.
    "errors": -1,  # Imports nothing; every layer raises its ConfigError.
}


def _package(module: str) -> str:
  """dpjax.train.loop -> "train"; dpjax -> ""."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path, module: str) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: resolve against this module's package.
        base = ".".join(module.split(".")[:-node.level] + [base]).strip(".")
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)
  return {m for m in out if m == "dpjax" or m.startswith("dpjax.")}


def violations(modules: dict[str, set[str]]) -> list[str]:
  """`a imports b` for every import from a lower layer into a higher one,
  or between two packages of one layer."""
  bad = []
  for module, imported in modules.items():
    src = _package(module)
    for target in imported:
      dst = _package(target)
      if dst not in LAYERS:  # dpjax.<name> of a symbol from __init__.
        dst = ""
      if dst != src and LAYERS[dst] >= LAYERS[src]:
        bad.append(f"{module} imports {target}")
  return sorted(bad)


def _tree() -> dict[str, set[str]]:
  modules = {}
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    module = ".".join(p for p in rel.parts if p != "__init__")
    modules[module] = _imports(path, module)
  return modules


def test_every_package_has_a_layer():
  packages = {_package(m) for m in _tree()}
  assert packages <= set(LAYERS), packages - set(LAYERS)


def test_imports_flow_one_way():
  assert violations(_tree()) == []


@pytest.mark.parametrize("module,target", [
    ("dpjax.train.loop", "dpjax.recipes"),  # The loop picking a recipe.
    ("dpjax.privacy.noise", "dpjax.train.step"),
    ("dpjax.data.pipeline", "dpjax.models.vit"),  # Siblings of one layer.
])
def test_an_upward_import_is_caught(module, target):
  assert violations({module: {target}}) == [f"{module} imports {target}"]
