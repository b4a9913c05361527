"""The search space of `python -m dpjax.tune`: a JSON file of config fields.

  {"train.learning_rate": {"log_uniform": [0.1, 10]},
   "privacy.l2_clip_norm": {"log_uniform": [0.1, 10]},
   "train.batch_size": {"choice": [64, 128]},
   "trials": {"distribution": "poisson", "mean": 4}}

Each field is `log_uniform` [lo, hi] (rounded for an integer field) or
`choice` [values]; "trials" (optional) is the distribution of the number of
trials K (flags override it). Every trial draws its values independently
from the space (with OS entropy, like K; never from config.seed).

Privacy: the search's epsilon needs the worst per-trial RDP over the space's
whole SUPPORT (privacy/tuning.py), so fields that set a trial's sigma, q or T
(`PRIVACY_FIELDS`) must be `choice` lists (their every combination is
accounted), and fields that change what is accounted in other ways (the
data, the mechanism, delta, the audit) cannot be searched.
"""

import itertools
import json
import math
from typing import Any, Mapping

import ml_collections
import numpy as np

from dpjax import errors

# Fields that set sigma, q or T: `choice` only, each combination accounted.
PRIVACY_FIELDS = ("train.batch_size", "train.steps",
                  "privacy.noise_multiplier", "privacy.target_epsilon")
# privacy.* fields free to search: the noise is a multiple of the clip norm,
# so they change utility, not the accounted mechanism.
FREE_PRIVACY_FIELDS = ("privacy.l2_clip_norm", "privacy.clipping",
                       "privacy.normalize_gamma", "privacy.method")
# Config blocks whose fields change the accounted mechanism or population.
_REFUSED_BLOCKS = ("privacy", "data", "audit", "recipe", "eval_only",
                   "init_checkpoint")
MAX_COMBINATIONS = 64


def _fail(field: str, value: Any, fix: str) -> errors.ConfigError:
  return errors.ConfigError(f"--space: {field}={value!r} is invalid: {fix}")


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  """config's value at a dotted path (KeyError if absent)."""
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def set_field(config: ml_collections.ConfigDict, field: str,
              value: Any) -> None:
  """Sets an existing dotted field (in place)."""
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def load(path: str) -> dict[str, Any]:
  """The space file as a dict (JSON)."""
  try:
    with open(path, encoding="utf-8") as f:
      space = json.load(f)
  except FileNotFoundError as e:
    raise errors.MissingFileError(f"--space={path!r}: no such file") from e
  except json.JSONDecodeError as e:
    raise errors.ConfigError(f"--space={path!r}: not JSON ({e})") from e
  if not isinstance(space, dict):
    raise errors.ConfigError(f"--space={path!r}: must be a JSON object")
  return space


def fields(space: Mapping[str, Any]) -> dict[str, dict]:
  """The searched config fields (every key but "trials")."""
  return {k: v for k, v in space.items() if k != "trials"}


def validate(space: Mapping[str, Any],
             config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError (naming --space and the field) for a field that
  is not in the config, has a bad range, or cannot be searched privately."""
  searched = fields(space)
  if not searched:
    raise errors.ConfigError("--space: names no config field to search")
  for field, spec in searched.items():
    try:
      current = get_field(config, field)
    except (KeyError, AttributeError):
      raise _fail(field, spec, "not a field of this config") from None
    if not isinstance(spec, dict) or len(spec) != 1 or not (
        set(spec) <= {"log_uniform", "choice"}):
      raise _fail(field, spec, 'use {"log_uniform": [lo, hi]} or '
                  '{"choice": [v1, v2, ...]}')
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
      raise _fail(field, spec, "give a non-empty list")
    if kind == "log_uniform" and not (
        len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
        and 0 < values[0] <= values[1]):
      raise _fail(field, spec, "log_uniform needs [lo, hi] with 0 < lo <= hi")
    if kind == "log_uniform" and not isinstance(current, (int, float)):
      raise _fail(field, spec, "log_uniform needs a numeric field")
    block = field.split(".")[0]
    if field in PRIVACY_FIELDS:
      if kind != "choice":
        raise _fail(field, spec, "it sets sigma, q or T: search it as a "
                    '{"choice": [...]} list (each value is accounted)')
    elif field not in FREE_PRIVACY_FIELDS and block in _REFUSED_BLOCKS:
      raise _fail(field, spec, "it changes the accounted mechanism, data "
                  "or population; it cannot be searched (searchable "
                  f"privacy fields: {PRIVACY_FIELDS + FREE_PRIVACY_FIELDS})")
  if len(privacy_combinations(space)) > MAX_COMBINATIONS:
    raise errors.ConfigError(
        f"--space: more than {MAX_COMBINATIONS} combinations of "
        f"{PRIVACY_FIELDS}: each is accounted; use fewer choices")


def privacy_combinations(space: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every combination of the searched PRIVACY_FIELDS' choices ([{}] if
  none is searched)."""
  names = [f for f in PRIVACY_FIELDS if f in space]
  values = [space[f]["choice"] for f in names]
  return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _cast(current: Any, value: Any) -> Any:
  if isinstance(current, bool) or not isinstance(current, (int, float)):
    return value
  if isinstance(current, int):
    return int(round(value))
  return float(value)


def draw(space: Mapping[str, Any], config: ml_collections.ConfigDict,
         rng: np.random.Generator) -> dict[str, Any]:
  """One trial's values: log-uniform or uniform among the choices."""
  out = {}
  for field, spec in fields(space).items():
    kind, values = next(iter(spec.items()))
    if kind == "choice":
      value = values[int(rng.integers(len(values)))]
    else:
      lo, hi = math.log(values[0]), math.log(values[1])
      value = math.exp(rng.uniform(lo, hi))
    out[field] = _cast(get_field(config, field), value)
  return out


def apply(config: ml_collections.ConfigDict,
          values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with `values` set (the config itself unchanged)."""
  out = config.copy_and_resolve_references()
  for field, value in values.items():
    set_field(out, field, _cast(get_field(config, field), value))
  return out
