"""Executes the notebooks in place, so that they are committed with outputs.

  python notebooks/run_all.py          # every notebooks/*.ipynb, in order
  python notebooks/run_all.py 00 05    # those whose name starts with 00 / 05
  python notebooks/run_all.py --tag=scorecard 03   # only the tagged cells

--tag executes only the cells tagged so (self-contained cells, e.g. the
scorecard plots, which read benchmarks/replication.json) in a fresh kernel
and keeps every other cell's committed outputs.

Full runs: DPJAX_NOTEBOOK_FAST (the test suite's half-step mode) is unset.
Each notebook runs in a fresh python3 kernel on this interpreter, from the
repository root, on the real device count (XLA_FLAGS is unset). The saved
notebook keeps only portable metadata (no timings, kernel versions or
paths); progress bars are reduced to their final state and ANSI colour codes
are removed, so the outputs stay small and readable on the web.
"""

import argparse
import os
import pathlib
import re
import sys
import time

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python",
                           "name": "python3"},
            "language_info": {"name": "python"}}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# A progress bar that never moved (e.g. an evaluation-only run).
_IDLE_BAR = re.compile(r"^\s*0%\|[^|]*\| 0/\d+ ")


def _ensure_python3_kernel():
  """Registers this interpreter's ipykernel as "python3" if none exists."""
  from jupyter_client import kernelspec  # pylint: disable=g-import-not-at-top
  try:
    kernelspec.KernelSpecManager().get_kernel_spec("python3")
  except kernelspec.NoSuchKernel:
    from ipykernel import kernelspec as ipk  # pylint: disable=g-import-not-at-top
    ipk.install(user=True, kernel_name="python3")


def clean_stream(text: str) -> str:
  """Drops ANSI codes, what a carriage return overwrites (tqdm) and progress
  bars that stayed at 0."""
  text = _ANSI.sub("", text)
  lines = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
  return "\n".join(l for l in lines if not _IDLE_BAR.match(l))


def clean_outputs(nb: nbformat.NotebookNode) -> None:
  """Merges consecutive stream outputs of one cell and cleans them."""
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    merged = []
    for out in cell.outputs:
      if (out.output_type == "stream" and merged and
          merged[-1].output_type == "stream" and merged[-1].name == out.name):
        merged[-1].text += out.text
      else:
        merged.append(out)
    for out in merged:
      if out.output_type == "stream":
        out.text = clean_stream(out.text)
    cell.outputs = [o for o in merged
                    if o.output_type != "stream" or o.text.strip()]
    cell.metadata.pop("execution", None)


def run(path: pathlib.Path, timeout: int, tag: str = "") -> float:
  """Executes one notebook (or only its cells tagged `tag`) and writes it
  back; returns the seconds taken."""
  nb = nbformat.read(path, as_version=4)
  cells = [c for c in nb.cells if not tag or (
      c.cell_type == "code" and tag in c.metadata.get("tags", []))]
  if not cells:
    sys.exit(f"{path.name}: no cell tagged {tag!r}")
  part = nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)
  client = nbclient.NotebookClient(
      part, timeout=timeout, kernel_name="python3", record_timing=False,
      resources={"metadata": {"path": str(ROOT)}})
  t0 = time.time()
  client.execute()
  for cell, done in zip(cells, part.cells):
    if cell.cell_type == "code":
      cell.outputs = done.outputs
  # Numbered as one top-to-bottom run would number them (the tagged cells
  # are self-contained, so their outputs are the same either way).
  for i, c in enumerate((c for c in nb.cells if c.cell_type == "code"), 1):
    c.execution_count = i
  clean_outputs(nb)
  nb.metadata = nbformat.from_dict(METADATA)
  nbformat.validate(nb)
  nbformat.write(nb, path)
  return time.time() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("prefixes", nargs="*",
                      help="notebook name prefixes (default: all)")
  parser.add_argument("--timeout", type=int, default=3600,
                      help="seconds per cell")
  parser.add_argument("--tag", default="",
                      help="execute only the code cells with this tag")
  args = parser.parse_args()
  paths = sorted(NOTEBOOKS.glob("*.ipynb"))
  if args.prefixes:
    paths = [p for p in paths if p.name.startswith(tuple(args.prefixes))]
  if not paths:
    sys.exit(f"no notebook matches {args.prefixes}")
  _ensure_python3_kernel()
  os.environ.pop("DPJAX_NOTEBOOK_FAST", None)
  os.environ.pop("XLA_FLAGS", None)
  # The kernel imports dpjax and configs from the repository root.
  os.environ["PATH"] = (os.path.dirname(sys.executable) + os.pathsep +
                        os.environ.get("PATH", ""))
  for path in paths:
    print(f"{path.name} ...", flush=True)
    print(f"{path.name}: {run(path, args.timeout, args.tag):.0f}s, "
          f"{path.stat().st_size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
  main()
