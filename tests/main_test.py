"""A bad command line or config is one line on stderr and exit status 2.

The flag-parsing cases run `dpjax.main`'s own parser in-process on a fresh
set of its flags; one of them and the config a library rejects run as real
`python -m dpjax.main` processes (exit status and stderr as a user sees them).
"""

import os
import subprocess
import sys

from absl import flags
import pytest

from configs import dp_linear
from dpjax import errors
from dpjax import main
from dpjax import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEAR = "--config=configs/dp_linear.py"
W = "--workdir=/nonexistent/never_written"  # Parsing writes nothing.

# (argv after the program name, what the one line must say)
BAD_FLAGS = [
    (["--config=configs/no_such.py", W], ["--config", "configs/no_such.py"]),
    (["--config=configs/dpcap.py:huge", W],
     ["configs/dpcap.py:huge", "unknown preset", ":tiny"]),
    (["--config=configs/dpcap.py:tiny,foo=1", W],
     ["configs/dpcap.py:tiny,foo=1", "'foo' unknown", "tan"]),
    ([LINEAR, "--config.train.stepz=3", W],
     ["--config.train.stepz", "'stepz'", 'Did you mean "steps"']),
    ([LINEAR, "--config.stepz=3", W], ["--config.stepz", "no field 'stepz'"]),
    ([LINEAR, "--config.train.steps=abc", W],
     ["--config.train.steps=abc", "'abc'"]),
    ([LINEAR], ["--workdir"]),  # A required flag missing.
]


def _parse(argv: list[str], monkeypatch) -> list[str]:
  """dpjax.main's own flag parser on a fresh set of its flags (config_flags
  reads the overrides from sys.argv)."""
  argv = ["dpjax.main"] + argv
  monkeypatch.setattr(sys, "argv", argv)
  flag_values = flags.FlagValues()
  main.define_flags(flag_values)
  return errors.flags_parser("dpjax", flag_values)(argv)


@pytest.mark.parametrize("argv,names", BAD_FLAGS,
                         ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_and_exit_2(argv, names, monkeypatch, capsys):
  with pytest.raises(SystemExit) as exit_:
    _parse(argv, monkeypatch)
  err = capsys.readouterr().err
  assert exit_.value.code == 2
  assert err.startswith("dpjax: ") and err.count("\n") == 1, err
  for name in names:
    assert name in err, (name, err)


def test_good_flags_parse(monkeypatch):
  rest = _parse([LINEAR, "--config.train.steps=7", W], monkeypatch)
  assert rest == ["dpjax.main"]


def test_traceback_flag_keeps_the_exception(monkeypatch):
  with pytest.raises(AttributeError, match="stepz"):
    _parse([LINEAR, "--config.train.stepz=3", W, "--traceback"], monkeypatch)


def test_a_value_the_library_rejects_is_a_config_error(tmp_path):
  config = dp_linear.get_config()
  config.privacy.target_epsilon = -1.0
  with pytest.raises(errors.ConfigError) as e:
    recipes.run(config, str(tmp_path))
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("config.privacy: ") and "-1" in str(e.value)


@pytest.mark.parametrize("argv,names", [
    (["--config.train.stepz=3"],
     ["--config.train.stepz", 'Did you mean "steps"']),
    (["--config.privacy.target_epsilon=-1"],
     ["config.privacy", "target_epsilon", "-1"]),
])
def test_real_command(argv, names, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dpjax.main", LINEAR, *argv,
       f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr
  line = proc.stderr.strip()
  assert "\n" not in line and line.startswith("dpjax: "), proc.stderr
  for name in names:
    assert name in line, (name, line)
