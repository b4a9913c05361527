"""Errors a user fixes in the config, shared by every layer of dpjax.

`dpjax.main` prints a `ConfigError` as one line (field, value, fix) and
exits with status 2 instead of a traceback (`--traceback` keeps it).
"""


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
