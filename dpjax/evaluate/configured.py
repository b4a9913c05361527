"""`from_config`: big_vision-style `config.evals` -> scheduled evaluators.

`config.evals` maps a name to a dict: `type` (a key of `builders.TYPES`),
`log_steps` (> 0: also run every that many steps during training; 0: only
at the end of the run; < 0: off) and that type's own fields; `prefix`
(default: the name) starts its metric names. Everything is checked when the
task is built; an evaluator is built, and its data loaded, on first use.
An evaluator that reads a data set the recipe marks as derived from the
private source (`Context.private_data`) is not public (`Scheduled.public`):
the loop logs it under "private_eval/" and never exports it.
"""

from collections.abc import Callable, Mapping
import inspect
import typing
from typing import Any

import ml_collections

from dpjax.evaluate import builders
from dpjax.evaluate.context import Context
from dpjax.evaluate.context import DataName
from dpjax.evaluate.context import FnName


class Scheduled:
  """One configured evaluator, when it runs, and whether its data are public
  (`public` False: derived from the private source; its metrics are not
  DP)."""

  def __init__(self, name: str, type_name: str, log_steps: int,
               build: Callable[[], Any], public: bool = True):
    self.name, self.type, self.log_steps = name, type_name, log_steps
    self.public = public
    self._build, self._evaluator = build, None

  def due(self, step: int) -> bool:
    """Whether it runs at training step `step` (the end runs every one)."""
    return self.log_steps > 0 and step % self.log_steps == 0

  def evaluator(self) -> Any:
    """The evaluator (built, its data loaded, on the first call)."""
    if self._evaluator is None:
      self._evaluator = self._build()
    return self._evaluator

  def run(self, params: Any) -> dict[str, float]:
    """{prefix/metric: value} on its held-out data; reads params only."""
    return self.evaluator().run(params)


def fields(type_name: str) -> tuple[set[str], set[str]]:
  """(all, required) field names of evaluator type `type_name`."""
  build, cls = builders.TYPES[type_name]
  own = [p for p in inspect.signature(build).parameters.values()
         if p.kind == p.KEYWORD_ONLY and p.name != "prefix"]
  passed = [p for n, p in inspect.signature(cls).parameters.items()
            if p.default is not p.empty or p.kind == p.KEYWORD_ONLY]
  valid = {p.name for p in own + passed} - {"prefix"}
  required = {p.name for p in own if p.default is p.empty}
  return valid, required


def data_names(type_name: str, entry: Mapping[str, Any]) -> set[str]:
  """The data sets (`DataName` fields, given or default) an evaluator of
  `type_name` configured by `entry` reads."""
  build = builders.TYPES[type_name][0]
  params = inspect.signature(build).parameters
  return {entry.get(f, params[f].default)
          for f, kind in typing.get_type_hints(build).items()
          if kind is DataName}


def _check(name: str, entry: Mapping[str, Any], context: Context) -> None:
  """Raises ValueError naming the field, its value and the fix."""
  where = f"config.evals.{name}"
  if "type" not in entry or entry["type"] not in builders.TYPES:
    raise ValueError(f"{where}.type={entry.get('type')!r} is not an "
                     f"evaluator type: use one of {sorted(builders.TYPES)}")
  t = entry["type"]
  log_steps = entry.get("log_steps")
  if not isinstance(log_steps, int) or isinstance(log_steps, bool):
    raise ValueError(f"{where}.log_steps={log_steps!r} is invalid: set an "
                     "int (> 0: every that many steps and at the end; 0: at "
                     "the end only; < 0: off)")
  valid, required = fields(t)
  given = set(entry) - {"type", "log_steps", "prefix"}
  unknown, missing = sorted(given - valid), sorted(required - given)
  if unknown:
    raise ValueError(f"{where}.{unknown[0]} is not a field of type {t!r}: "
                     f"its fields are {sorted(valid)}")
  if missing:
    raise ValueError(f"{where}.{missing[0]} is missing: type {t!r} requires "
                     "it")
  build = builders.TYPES[t][0]
  params = inspect.signature(build).parameters
  for f, kind in typing.get_type_hints(build).items():
    if kind not in (FnName, DataName):
      continue
    value = entry.get(f, params[f].default)
    if value not in context.names(kind):
      what = "function" if kind is FnName else "data set"
      raise ValueError(
          f"{where}.{f}={value!r}: the {context.recipe} recipe has no "
          f"{what} of that name; it has {context.names(kind)}: use one of "
          f"them or remove {where}")


def from_config(evals: ml_collections.ConfigDict,
                context: Context) -> dict[str, Scheduled]:
  """The evaluators of `config.evals` that are not off, checked now.

  Args:
    evals: config.evals, {name: {type, log_steps, ...fields}}.
    context: the recipe's functions and data.

  Returns:
    {name: Scheduled}, by name.

  Raises:
    ValueError: unknown type or field, missing field, bad log_steps, or a
      function / data set the recipe does not provide.
  """
  out = {}
  for name, cfg in evals.items():
    if isinstance(cfg, ml_collections.ConfigDict):
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      raise ValueError(f"config.evals.{name}={cfg!r} is not a dict: set "
                       "{type, log_steps, ...fields}")
    entry = dict(cfg)
    _check(name, entry, context)
    if entry["log_steps"] < 0:
      continue
    type_name = entry.pop("type")
    log_steps = entry.pop("log_steps")
    prefix = entry.pop("prefix", name)
    build = builders.TYPES[type_name][0]
    public = not data_names(type_name, entry) & context.private_data
    out[name] = Scheduled(
        name, type_name, log_steps,
        lambda build=build, prefix=prefix, entry=entry: build(
            context, prefix=prefix, **entry), public=public)
  return out
