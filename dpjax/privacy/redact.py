"""`repr`/`str` without secrets, for the objects that hold a secret key.

A noise or sampling key printed once (a log line, an exception note, a
debugger dump pasted in an issue) voids the guarantee: with the noise key
the noise can be subtracted, with the sampling key everyone knows each
batch. So every object that holds one names the field and hides its value.
"""

from typing import Any, Callable

SECRET = "<secret>"


def namedtuple_repr(*secret_fields: str) -> Callable[[Any], str]:
  """A `__repr__` for a NamedTuple class that prints `secret_fields` as
  "<secret>" (use: `__repr__ = redact.namedtuple_repr("rng_key")` in the
  class body; `str` uses it too)."""

  def __repr__(self) -> str:
    parts = (f"{name}={SECRET if name in secret_fields else repr(value)}"
             for name, value in zip(self._fields, self))
    return f"{type(self).__name__}({', '.join(parts)})"

  return __repr__
