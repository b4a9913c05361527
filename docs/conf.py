"""Sphinx configuration of the dpjax docs (MyST markdown, API by autodoc).

Build: pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build
Notebooks render with their committed outputs (never executed here): they are
copied from notebooks/ into docs/_notebooks/ (gitignored) at build start,
since Sphinx reads only files under docs/. The API page's table of every
public name of dpjax.privacy is generated into docs/api/_generated/.
"""

import ast
import os
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # autodoc imports dpjax

project = "dpjax"
author = "the dpjax authors"
copyright = "the dpjax authors"  # pylint: disable=redefined-builtin

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

nb_execution_mode = "off"  # committed outputs only; no kernel at build time
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links resolve

autodoc_default_options = {"members": True, "undoc-members": True,
                           "member-order": "bysource"}
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # Attributes: as fields (no duplicate field entries)

html_theme = "furo"
html_title = "dpjax"


def _copy_notebooks() -> None:
  """notebooks/*.ipynb -> docs/_notebooks/ (the committed outputs as-is)."""
  out = DOCS / "_notebooks"
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir()
  for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
    shutil.copy2(nb, out / nb.name)


def _privacy_names_table() -> None:
  """docs/api/_generated/privacy_names.inc: every public dpjax.privacy name
  with a link to where it is defined (so the list cannot go stale)."""
  import dpjax.privacy  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  rows = ["| name | defined in |", "|---|---|"]
  for name in sorted(vars(dpjax.privacy), key=str.lower):
    obj = getattr(dpjax.privacy, name)
    if name.startswith("_") or isinstance(obj, types.ModuleType):
      continue
    target = f"{obj.__module__}.{obj.__qualname__}"
    rows.append(f"| {{py:obj}}`{name} <{target}>` | `{obj.__module__}` |")
  out = DOCS / "api" / "_generated"
  out.mkdir(exist_ok=True)
  (out / "privacy_names.inc").write_text("\n".join(rows) + "\n")


# python -m <module>: the file whose module docstring documents the command.
ENTRY_POINTS = {"dpjax.main": "dpjax/main.py", "dpjax.plan": "dpjax/plan.py",
                "dpjax.tune": "dpjax/tune/__main__.py",
                "dpjax.prepare": "dpjax/prepare/__main__.py"}


def _entry_points_page() -> None:
  """docs/api/_generated/entry_points.inc: each command's module docstring,
  read with ast (importing them would define their absl flags twice)."""
  parts = []
  for module, path in ENTRY_POINTS.items():
    doc = ast.get_docstring(ast.parse((REPO / path).read_text()))
    parts.append(f"## `python -m {module}`\n\nFrom `{path}`:\n\n"
                 f"````text\n{doc}\n````\n")
  out = DOCS / "api" / "_generated"
  out.mkdir(exist_ok=True)
  (out / "entry_points.inc").write_text("\n".join(parts))


_copy_notebooks()
_privacy_names_table()
_entry_points_page()
