"""Imports flow one way: main/plan -> recipes -> train -> data | models |
evaluate -> privacy (README, "Layout"); the offline tool `prepare` reads
data and privacy, and nothing of dpjax imports it. Every `import` in
dpjax/ (lazy ones inside functions included) is checked. No two modules
import each other (no cycle), and no module reads a private `_name` of
another one."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dpjax"
# Higher layers may import lower ones; a package imports only itself and
# lower layers (data, models and evaluate do not import each other).
LAYERS = {
    "main": 4, "plan": 4, "tune": 4,
    "recipes": 3,
    "train": 2, "prepare": 2,
    "data": 1, "models": 1, "evaluate": 1,
    "privacy": 0, "private_files": 0, "": 0,  # "": the package's __init__.
    "errors": -1,  # Imports nothing; every layer raises its ConfigError.
}
# Offline tools: run as commands, imported by no other package of dpjax.
TOOLS = ("prepare",)


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
  between two packages of one layer, or of a tool from outside it."""
  bad = []
  for module, imported in modules.items():
    src = _package(module)
    for target in imported:
      dst = _package(target)
      if dst not in LAYERS:  # dpjax.<name> of a symbol from __init__.
        dst = ""
      if dst != src and (LAYERS[dst] >= LAYERS[src] or dst in TOOLS):
        bad.append(f"{module} imports {target}")
  return sorted(bad)


def _files() -> dict[str, pathlib.Path]:
  out = {}
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    out[".".join(p for p in rel.parts if p != "__init__")] = path
  return out


def _tree() -> dict[str, set[str]]:
  return {module: _imports(path, module)
          for module, path in _files().items()}


def _resolved(path: pathlib.Path, module: str,
              known: set[str]) -> tuple[set[str], dict[str, str], list[str]]:
  """(modules imported, alias -> module, `from m import _x` names).

  `from pkg import sub` imports the module pkg.sub (not pkg's symbols), as
  `import pkg.sub` does; `from m import name` of a symbol imports m.
  """
  targets, aliases, private = set(), {}, []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name in known:
          targets.add(a.name)
          if a.asname:
            aliases[a.asname] = a.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(module.split(".")[:-node.level] + [base]).strip(".")
      for a in node.names:
        if f"{base}.{a.name}" in known:
          targets.add(f"{base}.{a.name}")
          aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif base in known:
          targets.add(base)
          if _is_private(a.name):
            private.append(f"{base}.{a.name}")
  targets.discard(module)
  return targets, aliases, private


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def module_graph() -> dict[str, set[str]]:
  """dpjax module -> the dpjax modules it imports (lazy imports included)."""
  files = _files()
  return {m: _resolved(p, m, set(files))[0] for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):  # Tarjan's algorithm; dpjax/ is shallow enough to recurse.
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while not comp or comp[-1] != v:
        comp.append(stack.pop())
        on.discard(comp[-1])
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def private_uses() -> list[str]:
  """`a uses b._x` for every private name of module b read in module a."""
  files = _files()
  bad = []
  for module, path in files.items():
    _, aliases, private = _resolved(path, module, set(files))
    names = set(private)
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and _is_private(node.attr)):
        names.add(f"{aliases[node.value.id]}.{node.attr}")
    bad += [f"{module} uses {name}" for name in sorted(names)]
  return sorted(bad)


def test_every_package_has_a_layer():
  packages = {_package(m) for m in _tree()}
  assert packages <= set(LAYERS), packages - set(LAYERS)


def test_imports_flow_one_way():
  assert violations(_tree()) == []


@pytest.mark.parametrize("module,target", [
    ("dpjax.train.loop", "dpjax.recipes"),  # The loop picking a recipe.
    ("dpjax.privacy.noise", "dpjax.train.step"),
    ("dpjax.data.pipeline", "dpjax.models.vit"),  # Siblings of one layer.
    ("dpjax.main", "dpjax.prepare.run"),  # The runtime using the tool.
    ("dpjax.prepare.run", "dpjax.train.loop"),  # The tool using the loop.
])
def test_an_upward_import_is_caught(module, target):
  assert violations({module: {target}}) == [f"{module} imports {target}"]


def test_no_import_cycle():
  assert cycles(module_graph()) == []


def test_a_cycle_is_caught():
  graph = {"dpjax.a": {"dpjax.b"}, "dpjax.b": {"dpjax.c"},
           "dpjax.c": {"dpjax.a"}, "dpjax.d": {"dpjax.a"}}
  assert cycles(graph) == [["dpjax.a", "dpjax.b", "dpjax.c"]]


def test_no_private_name_read_across_modules():
  assert not private_uses()
