"""Executes every notebooks/*.ipynb top to bottom (kernel python3)."""

import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _ensure_python3_kernel():
  """Registers this interpreter's ipykernel as "python3" if none exists."""
  from jupyter_client import kernelspec  # pylint: disable=g-import-not-at-top
  try:
    kernelspec.KernelSpecManager().get_kernel_spec("python3")
  except kernelspec.NoSuchKernel:
    from ipykernel import kernelspec as ipk  # pylint: disable=g-import-not-at-top
    ipk.install(user=True, kernel_name="python3")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
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
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
  images = [o for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert images, "expected the notebook to render its plot"
