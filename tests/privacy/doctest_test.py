"""The docstring examples (>>>) of dpjax.privacy run in the test suite.

pytest collects them itself (setup.cfg: `--doctest-modules` over the
`dpjax/privacy` test path, so a plain `pytest` runs every example once);
this test fails if that wiring is lost or misses a module with examples.
"""

import configparser
import pathlib
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dpjax" / "privacy"


def _pytest_config() -> tuple[list[str], list[str]]:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  section = cfg["tool:pytest"]
  return section["testpaths"].split(), shlex.split(section["addopts"])


def test_privacy_examples_are_collected_as_doctests():
  testpaths, addopts = _pytest_config()
  assert "--doctest-modules" in addopts
  assert "dpjax/privacy" in testpaths
  # No --ignore / --deselect drops a module of the package.
  ignored = [a.split("=", 1)[1] for a in addopts if a.startswith("--ignore")]
  with_examples = sorted(
      p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
      if ">>> " in p.read_text())
  assert len(with_examples) >= 10, with_examples
  for module in with_examples:
    assert not any(module.startswith(i.rstrip("/")) for i in ignored), module
