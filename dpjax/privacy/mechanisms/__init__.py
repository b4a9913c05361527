"""DP mechanisms as objects, one module each, keyed by `privacy.mechanism`.

`resolve(config.privacy, ...)` returns the phase's `base.Mechanism`: its
sampler, noise transform, ledger records, epsilon, calibration, public
description and resume signature (base.py). Adding a mechanism: a module
`<name>.py` here whose `MECHANISM` is its class (with `name = "<name>"`),
plus its name in `NAMES`; the shared suite
(tests/privacy/mechanisms_test.py) then runs it.
"""

import importlib
from typing import Any, Mapping

from dpjax.privacy.mechanisms import base
from dpjax.privacy.mechanisms.base import Mechanism

NAMES = ("dpsgd", "bandmf", "blt", "truncated_poisson")
REGISTRY: dict[str, type[Mechanism]] = {
    n: importlib.import_module(f"{__name__}.{n}").MECHANISM for n in NAMES}


def knob_defaults() -> dict[str, Any]:
  """Every registered mechanism's own `config.privacy` knobs -> default."""
  out = {}
  for cls in REGISTRY.values():
    out.update(cls.knobs)
  return out


def get(name: str) -> type[Mechanism]:
  """The class registered as `name` (ConfigError naming privacy.mechanism)."""
  if name not in REGISTRY:
    base.fail("privacy.mechanism", name, "use one of " +
              ", ".join(f'"{n}"' for n in REGISTRY))
  return REGISTRY[name]


def resolve(cfg: Mapping, *, noise_multiplier: float, num_examples: int,
            batch_size: int, steps: int, delta: float,
            accountant: str) -> Mechanism:
  """The mechanism `cfg.mechanism` (default "dpsgd") of a phase, sigma as
  given (`Mechanism.calibrated` for a target epsilon). Knobs of other
  mechanisms must stay at their defaults: a value there would be ignored
  (e.g. privacy.bands under "dpsgd")."""
  cls = get(cfg.get("mechanism", "dpsgd"))
  for knob, default in knob_defaults().items():
    if knob not in cls.knobs and cfg.get(knob, default) != default:
      owners = [n for n, c in REGISTRY.items() if knob in c.knobs]
      base.fail(f"privacy.{knob}", cfg.get(knob), f"it is a knob of "
                f"privacy.mechanism={' or '.join(map(repr, owners))}, not of "
                f"{cls.name!r}: set that mechanism or leave it at {default!r}")
  return cls.resolve(cfg, noise_multiplier=noise_multiplier,
                     num_examples=num_examples, batch_size=batch_size,
                     steps=steps, delta=delta, accountant=accountant)


__all__ = ["Mechanism", "NAMES", "REGISTRY", "get", "knob_defaults",
           "resolve"]
