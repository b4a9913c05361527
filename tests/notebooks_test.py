"""Executes every notebooks/*.ipynb top to bottom (kernel python3), and checks
the committed files: their outputs, their Colab install cell, their closing
cell and that no text points at a file missing from the repository."""

import configparser
import os
import pathlib
import re
import subprocess
import sys
import types

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache",
              ".ipynb_checkpoints", "runs"}


def _ensure_python3_kernel():
  """Registers this interpreter's ipykernel as "python3" if none exists."""
  from jupyter_client import kernelspec  # pylint: disable=g-import-not-at-top
  try:
    kernelspec.KernelSpecManager().get_kernel_spec("python3")
  except kernelspec.NoSuchKernel:
    from ipykernel import kernelspec as ipk  # pylint: disable=g-import-not-at-top
    ipk.install(user=True, kernel_name="python3")


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _plots(nb) -> bool:
  return any("plt." in c.source for c in _code_cells(nb))


def _pngs(nb) -> list:
  return [o for c in _code_cells(nb) for o in c.get("outputs", [])
          if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path, monkeypatch):
  _ensure_python3_kernel()
  # The kernel runs on this interpreter, on the real CPU device count (plots
  # use ipykernel's inline backend, which needs no display).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  # Notebooks that train for minutes take half their steps here (the same
  # code path; their committed outputs come from full runs).
  monkeypatch.setenv("DPJAX_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep +
                     os.environ.get("PATH", ""))
  # Executed in memory (nbclient clears each cell's committed outputs before
  # running it); the file is never written back.
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
  if _plots(nb):
    assert _pngs(nb), "expected the notebook to render its plots"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_with_outputs(path):
  """Committed after one clean top-to-bottom run (notebooks/run_all.py)."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  cells = _code_cells(nb)
  assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), (
      "run `python notebooks/run_all.py` and commit the outputs")
  outputs = [o for c in cells for o in c.outputs]
  assert any(o.output_type == "stream" for o in outputs)
  assert not [o for o in outputs if o.output_type == "error"]
  if _plots(nb):
    assert _pngs(nb), "a notebook that plots is committed with its PNGs"
  for o in outputs:
    assert not set(o.get("data", {})) & {
        "application/vnd.jupyter.widget-view+json", "text/html"}, o
    if o.output_type == "stream":
      assert "\x1b[" not in o.text and "\r" not in o.text, o.text[:200]
  assert set(nb.metadata) <= {"kernelspec", "language_info"}, nb.metadata
  assert all("execution" not in c.metadata for c in cells)
  assert path.stat().st_size < 1_500_000


def _repo_url() -> str:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  return cfg["metadata"]["url"]


def _exec_first_cell(path, monkeypatch, colab: bool) -> list:
  """Runs the first code cell in a fresh namespace; returns the calls it
  made to subprocess / os.system / os.chdir (all mocked)."""
  calls = []
  record = lambda name: lambda *a, **k: calls.append((name, a, k))
  for name in ("run", "call", "check_call", "check_output", "Popen"):
    monkeypatch.setattr(subprocess, name, record(name))
  monkeypatch.setattr(os, "system", record("system"))
  monkeypatch.setattr(os, "chdir", record("chdir"))
  monkeypatch.setattr(sys, "path", list(sys.path))
  if colab:
    try:
      import google  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab",
                        types.ModuleType("google.colab"))
  else:
    monkeypatch.setitem(sys.modules, "google.colab", None)  # Not importable.
  first = _code_cells(nbformat.read(path, as_version=4))[0]
  exec(compile(first.source, str(path), "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  return calls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_cell_installs_in_colab_only(path, monkeypatch):
  source = _code_cells(nbformat.read(path, as_version=4))[0].source
  assert "google.colab" in source and _repo_url() in source
  path_before = list(sys.path)
  assert _exec_first_cell(path, monkeypatch, colab=False) == []
  assert sys.path == path_before
  calls = _exec_first_cell(path, monkeypatch, colab=True)
  argv = [" ".join(map(str, a[0])) for name, a, _ in calls if name == "run"]
  assert any("git clone" in c and _repo_url() in c for c in argv), calls
  assert any("-m pip install" in c for c in argv), calls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_title_and_closing_cells(path):
  nb = nbformat.read(path, as_version=4)
  colab = ("https://colab.research.google.com/github/"
           + _repo_url().split("github.com/")[1]
           + f"/blob/main/notebooks/{path.name}")
  assert nb.cells[0].cell_type == "markdown" and colab in nb.cells[0].source
  assert colab in (ROOT / "README.md").read_text()
  last = nb.cells[-1]
  assert last.cell_type == "markdown"
  assert last.source.startswith("## What this shows / what it does not")
  assert "TODO" not in last.source


def _repo_files() -> tuple[set[str], set[str]]:
  """(relative paths, base names) of the files in the repository."""
  rel, names = set(), set()
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = [d for d in dirnames
                   if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
    for f in filenames:
      rel.add(os.path.relpath(os.path.join(dirpath, f), ROOT))
      names.add(f)
  return rel, names


_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FILE = re.compile(r"(?<![\w/.<-])((?:[\w-]+/)*[\w-]+\.(?:md|ipynb|py|cfg|toml))"
                   r"(?![\w])")


def _markdown_texts():
  """(where, directory of its links, text) of every markdown the repository
  shows a reader: the notebooks' markdown cells and *.md files."""
  rel, _ = _repo_files()
  for f in sorted(rel):
    if f.endswith(".md"):
      yield f, (ROOT / f).parent, (ROOT / f).read_text()
  for path in NOTEBOOKS:
    for i, c in enumerate(nbformat.read(path, as_version=4).cells):
      if c.cell_type == "markdown":
        yield f"{path.name} cell {i}", path.parent, c.source


def test_markdown_references_exist():
  """Relative links resolve, and every file name a text mentions (x.md,
  dir/y.py, ...) is a file of the repository."""
  rel, names = _repo_files()
  missing = []
  for where, base, text in _markdown_texts():
    for target in _LINK.findall(text):
      if re.match(r"[a-z]+:|#", target):
        continue
      if not (base / target.split("#")[0]).exists():
        missing.append((where, target))
    for name in _FILE.findall(text):
      if name not in rel and name.split("/")[-1] not in names:
        missing.append((where, name))
  assert not missing, missing
