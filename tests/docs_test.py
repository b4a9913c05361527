"""The docs: the Sphinx site builds with warnings as errors (a broken
internal link, a missing cross-reference target or a docstring docutils
cannot parse fails it), no tracked file holds one machine's absolute paths,
and every shell block a reader may copy is run by a test or says what it
needs."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The content pages, rewritten on another branch; checked once they land.
_TEXT = (".md", ".py", ".cfg", ".ipynb", ".sh", ".sbatch", ".txt", ".json",
         ".toml", ".yaml", ".yml")
# An absolute path into a home, work or temporary folder (the pattern is
# spelled so that this file does not match it).
_MACHINE_PATH = re.compile(
    r"(?<![\w.~-])/(?:home|Users|root|work|tmp|private/var)/"
    r"|\b[A-Za-z]:\\\\?Users\\")
_FENCE = re.compile(r"^(```+|~~~+)[ \t]*\{?(\w*)\}?[^\n]*\n(.*?)^\1[ \t]*$",
                    re.M | re.S)
_SHELL = {"bash", "sh", "shell", "console"}
_TESTED = re.compile(r"^\s*# tested: (tests/\S+\.py)\s*$", re.M)
_NEEDS = re.compile(r"^\s*# needs: \S.*$", re.M)
# The program a command line runs: `python -m <module>`, `python <script>`,
# or a script run directly (`launch/x.sh ...`); not its arguments.
_ENTRY = re.compile(r"^\s*(?:\S*python\S*\s+(?:-m\s+([\w.]+)|([\w./-]+\.py))"
                    r"|(?:bash\s+|\./)?([\w./-]+\.(?:sh|sbatch))\b)")
# What a test may call instead of the command itself: `dpjax.main` parses
# flags and calls `recipes.run(config, workdir)`.
_ALIASES = {"main": ("main", "recipes.run")}


def _tracked() -> list[str]:
  out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return [f for f in out.split("\0") if f]


def test_docs_build_with_warnings_as_errors(tmp_path):
  out = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
       "-b", "html", "-d", str(tmp_path / "doctrees"), "docs", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-20000:]
  # Every public dpjax.privacy name links to its API entry.
  index = (out / "api" / "index.html").read_text()
  rows = re.findall(r'<tr class="row-(?:odd|even)">(.*?)</tr>', index, re.S)
  unlinked = [r for r in rows[1:] if "href" not in r]
  assert len(rows) > 20 and not unlinked, unlinked
  # Notebooks render with their committed outputs.
  nb = out / "_notebooks" / "00_dp_optax_quickstart.html"
  assert 'class="cell_output' in nb.read_text()


def test_no_machine_paths_in_tracked_files():
  found = []
  for f in _tracked():
    if not f.endswith(_TEXT):
      continue
    path = ROOT / f
    if not path.is_file():  # deleted in the work tree, not yet committed
      continue
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
      if _MACHINE_PATH.search(line):
        found.append(f"{f}:{i + 1}: {line.strip()[:120]}")
  assert not found, "\n".join(found)


def test_machine_path_pattern():
  for bad in ("/" + "home/me/x", "PYTHONPATH=. /" + "work/v/bin/python",
              "--workdir=/" + "tmp/run", '"/' + 'Users/me"',
              "C:\\" + "Users\\me", "/" + "private/var/folders/x"):
    assert _MACHINE_PATH.search(bad), bad
  for ok in ("runs/dpcap", "gs://bucket/tmp/x", "~/dpjax", "./tmp/x",
             "$WORKDIR/logs", ".venv/bin/python", "src/work/x"):
    assert not _MACHINE_PATH.search(ok), ok


def _shell_blocks(text: str):
  for m in _FENCE.finditer(text):
    if m.group(2) in _SHELL:
      yield text[:m.start()].count("\n") + 1, m.group(3)


def _block_problem(block: str) -> str:
  """Why a shell block is neither tested nor marked ('' when it is fine).
  A `# tested: tests/x.py` file must exist and name each entry point the
  block runs (`python -m dpjax.prepare` -> "prepare", `tools/y.py` -> "y")."""
  tested = _TESTED.findall(block)
  if not tested:
    return "" if _NEEDS.search(block) else "no '# tested:' or '# needs:' line"
  for t in tested:
    if not (ROOT / t).is_file():
      return f"{t} does not exist"
  text = "".join((ROOT / t).read_text() for t in tested)
  for line in block.splitlines():
    if line.lstrip().startswith("#"):
      continue
    for module, script, shell in _ENTRY.findall(line):
      name = (module.split(".")[-1] if module else
              pathlib.Path(script or shell).stem)
      if not any(a in text for a in _ALIASES.get(name, (name,))):
        return f"{', '.join(tested)} does not mention {name!r}"
  return ""


def test_shell_blocks_are_tested_or_marked():
  docs = [f for f in _tracked() if f == "README.md"
          or (f.startswith("docs/") and f.endswith(".md"))]
  bad = []
  for f in docs:
    for line, block in _shell_blocks((ROOT / f).read_text()):
      problem = _block_problem(block)
      if problem:
        bad.append(f"{f}:{line}: {problem}")
  assert not bad, "\n".join(bad)


def test_shell_block_check():
  text = ("```bash\npython -m dpjax.plan --config=c\n```\n"
          "```sh\n# needs: a TPU pod\nlaunch/tpu_vm.sh t z c gs://b\n```\n"
          "```python\nprint(1)\n```\n")
  blocks = list(_shell_blocks(text))
  assert [line for line, _ in blocks] == [1, 4]
  assert _block_problem(blocks[0][1]) == "no '# tested:' or '# needs:' line"
  assert _block_problem(blocks[1][1]) == ""
  assert _block_problem("# tested: tests/plan_test.py\n"
                        "python -m dpjax.plan --config=c\n") == ""
  assert "does not mention 'tune'" in _block_problem(
      "# tested: tests/plan_test.py\npython -m dpjax.tune\n")
  assert "does not exist" in _block_problem(
      "# tested: tests/nowhere_test.py\npython -m dpjax.plan\n")
