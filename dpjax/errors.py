"""Errors a user fixes in the config, shared by every layer of dpjax.

`dpjax.main` and `dpjax.plan` print a bad command line or config as one line
on stderr and exit with status 2 instead of a traceback (`--traceback` keeps
it): a `ConfigError` (field, value, fix), and what absl and ml_collections
raise while parsing the flags (`flags_parser`): a config file that does not
exist, an unknown preset or config arg, a misspelled field (with its "did you
mean" hint), a value of the wrong type. A library's ValueError about a
config value becomes a `ConfigError` where the config is resolved
(`config_block`).
"""

import contextlib
import re
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from absl import flags


class ConfigError(ValueError):
  """An invalid config field: the message names the field, value and fix."""


class MissingFileError(ConfigError, FileNotFoundError):
  """A file or directory the config names does not exist (the message says
  how to pass or make one)."""


def config_error(field: str, value, fix: str) -> ConfigError:
  """`ConfigError("config.<field>=<value!r> is invalid: <fix>")`.

  >>> str(config_error("train.steps", 0, "must be positive"))
  'config.train.steps=0 is invalid: must be positive'
  """
  return ConfigError(f"config.{field}={value!r} is invalid: {fix}")


@contextlib.contextmanager
def config_block(block: str) -> Iterator[None]:
  """Inside, a ValueError (a library rejecting a value of `config.<block>`,
  e.g. privacy's "target_epsilon must be > 0") is raised as a ConfigError
  naming the block; other errors pass unchanged.

  >>> try:
  ...   with config_block("privacy"):
  ...     raise ValueError("target_epsilon must be > 0, got -1.0.")
  ... except ConfigError as e:
  ...   print(e)
  config.privacy: target_epsilon must be > 0, got -1.0.
  """
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"config.{block}: {e}") from e


_FLAG = re.compile(r"^flag (--\S+): ")  # absl: "flag --name=value: why".
_TRACEBACK = "Traceback (most recent call last)"


def _unwrap(e: BaseException) -> tuple[BaseException, str]:
  """The error `e` wraps as its argument (ml_collections raises an unknown
  field as AttributeError(KeyError(text))) and its text (str() of a
  KeyError is the repr of its text)."""
  while len(e.args) == 1 and isinstance(e.args[0], BaseException):
    e = e.args[0]
  if len(e.args) == 1 and isinstance(e.args[0], str):
    return e, e.args[0]
  return e, str(e)


def one_line(e: BaseException, argv: Sequence[str] = ()) -> str:
  """`e`, raised while parsing the flags, as one line that keeps the hint.

  absl raises "flag --x=v: why"; ml_collections re-raises an error of
  `get_config` with its traceback as the message (the error itself is the
  __context__), an unknown field as an AttributeError around a KeyError
  whose text ends in "Did you mean ...?" (the override is looked up in
  `argv`), and a config file that fails to load as an OSError listing what
  it tried (its last line says why).
  """
  text = str(e)
  flag = _FLAG.match(text)
  while _TRACEBACK in str(e) and e.__context__ is not None:
    e = e.__context__
  inner, text = _unwrap(e)
  text = text.strip()
  if isinstance(inner, KeyError):
    key, _, hint = text.partition("\n")
    name = key.strip("'\"")
    arg = next((a.split("=", 1)[0] for a in argv if a.startswith("--") and
                name in re.split(r"[.=]", a.lstrip("-"))), None)
    text = f"{arg or 'config'}: no field {key}. {hint}"
  elif isinstance(e, OSError):
    text = f"--config: {text.splitlines()[-1].strip()}"
  elif text.startswith("flag "):
    text = text[len("flag "):]
  elif flag and flag.group(1).split("=", 1)[-1] not in text:
    text = f"{flag.group(1)}: {text}"
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def exit_bad_config(e: BaseException, prog: str,
                    argv: Sequence[str] = ()) -> NoReturn:
  """Prints `prog: <one line>` on stderr and exits with status 2."""
  print(f"{prog}: {one_line(e, argv)}", file=sys.stderr, flush=True)
  sys.exit(2)


def _wants_traceback(argv: Sequence[str]) -> bool:
  return any(a.lstrip("-") in ("traceback", "traceback=true", "traceback=1")
             for a in argv)


def flags_parser(prog: str, flag_values: flags.FlagValues = flags.FLAGS
                 ) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing for `app.run(main, flags_parser=...)` in which any
  error (a bad --config, an unknown or ill-typed field, a missing flag) is
  one line and exit status 2 (`exit_bad_config`); --traceback re-raises it.
  The --config file is loaded here, so a missing one fails here too."""

  def parse(argv: list[str]) -> list[str]:
    try:
      rest = flag_values(argv)
      if "config" in flag_values:
        # A config file that failed to load raises on any attribute access.
        getattr(flag_values["config"].value, "keys", None)
    except Exception as e:  # pylint: disable=broad-except
      if _wants_traceback(argv):
        raise
      exit_bad_config(e, prog, argv)
    return rest

  return parse
