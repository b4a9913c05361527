"""`Mechanism`: one DP noise mechanism of a phase, as one object.

A mechanism holds its resolved plain values (sigma, q, the phase's steps T,
N, delta, accountant and its own knobs) and owns everything that must agree
for its epsilon to hold: which rows step t reads (`sampler`), the noise
transform (`noise`, an optax transformation whose state holds the secret
key), what the privacy ledger records for steps [start, start + n)
(`record`), the whole phase's epsilon and sigma calibration, its public
description, its resume signature and the validation of its config knobs.
The training loop, step, input pipeline, ledger and plan call these
methods and never branch on a mechanism's name: a new mechanism is one
file in this package plus its name in `mechanisms.NAMES`
(docs/mechanisms.md, "Adding a mechanism").

Knobs are fields of `config.privacy` (configs/common.py:privacy_block);
a mechanism reads them from any mapping with `.get` (this layer never
imports ml_collections), and its errors name the field, value and fix.
"""

import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np
import optax

from dpjax.errors import config_error
from dpjax.privacy import audit
from dpjax.privacy import sampling


def fail(field: str, value, fix: str):
  """Raises `dpjax.errors.config_error(field, value, fix)`."""
  raise config_error(field, value, fix)


def check_cycle(field: str, cycle, *, steps: int, batch_size: int,
                num_examples: int) -> int:
  """A b-cyclic sampler's b: 1 <= b <= T and b * batch <= N (each step
  samples one of b partitions at rate q b <= 1)."""
  if not isinstance(cycle, int) or cycle < 1 or (cycle > 1 and (
      cycle > steps or batch_size * cycle > num_examples)):
    name = field.split(".")[-1]
    fail(field, cycle, f"use 1 <= {name} <= train.steps={steps} with "
         f"batch_size * {name} <= N={num_examples} (each step samples one "
         f"of `{name}` partitions at rate q * {name})")
  return cycle


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """A resolved DP mechanism of one phase (plain values; see module doc).

  Attributes:
    noise_multiplier: sigma (0: no noise, infinite epsilon).
    sampling_rate: q = expected batch / N.
    steps: T, the phase's steps (correlated noise is planned for them).
    num_examples: N, privacy units of the phase's source.
    delta: the target delta.
    accountant: "pld" or "rdp".
  """
  noise_multiplier: float
  sampling_rate: float
  steps: int
  num_examples: int
  delta: float
  accountant: str

  name: ClassVar[str] = ""
  # Its own config.privacy fields -> defaults (other mechanisms' knobs must
  # stay at their defaults under this one).
  knobs: ClassVar[dict[str, Any]] = {}
  # True: its steps are tied together (correlated noise, one accounting for
  # the phase), so sigma and its knobs may not change mid-phase; False:
  # the ledger records each step's own values.
  correlated: ClassVar[bool] = False
  # False: the sampler is not plain Poisson, so phases with their own
  # batching (user-level clients) cannot run it.
  poisson: ClassVar[bool] = False
  # Whether a TAN simulation (privacy.tan_reference_batch_size) may run it.
  tan_simulation: ClassVar[bool] = False
  # Signature / describe fact -> the config field behind it (refusals).
  fields: ClassVar[dict[str, str]] = {}

  @classmethod
  def own_knobs(cls, cfg: Mapping, *, steps: int, batch_size: int,
                num_examples: int, accountant: str) -> dict[str, Any]:
    """Validates this mechanism's knobs in `cfg` (`config.privacy`) and
    returns them as constructor keywords. Default: none."""
    del cfg, steps, batch_size, num_examples, accountant
    return {}

  @classmethod
  def resolve(cls, cfg: Mapping, *, noise_multiplier: float,
              num_examples: int, batch_size: int, steps: int, delta: float,
              accountant: str) -> "Mechanism":
    """The mechanism of a phase with these values (sigma as given: see
    `calibrated`); raises a ConfigError for an invalid knob."""
    own = cls.own_knobs(cfg, steps=steps, batch_size=batch_size,
                        num_examples=num_examples, accountant=accountant)
    return cls(float(noise_multiplier), batch_size / num_examples, int(steps),
               int(num_examples), float(delta), accountant, **own)

  # --- What it runs. ---
  def sampler(self) -> sampling.Sampler:
    """Which rows each step reads (the input pipeline calls it)."""
    raise NotImplementedError

  def noise(self, sum_fn, expected_batch_size: float, seed=None,
            initial_count: int = 0) -> optax.GradientTransformation:
    """The noise head of the step: its input is the clipped sum of
    `sum_fn` (a `clipping.BoundedSum`: the noise reads its bound), its
    output the noisy sum / `expected_batch_size`; the secret root key
    (`seed`: None draws OS entropy at init) and the count of updates
    (from `initial_count`, the global step) live in its state."""
    raise NotImplementedError

  def noise_covariance(self) -> np.ndarray:
    """float64[T, T]: the covariance over the phase's steps of the noise
    `noise` adds to one coordinate, in units of (sigma C / expected
    batch)^2 (C: the sum's bound). Default: fresh noise each step (I)."""
    return np.eye(self.steps)

  def canary_scores(self, l2_clip_norm: float, noise_multiplier: float,
                    included: np.ndarray, *, canaries_per_step: int,
                    seed: int) -> np.ndarray:
    """White-box scores of Dirac canaries through this mechanism's real
    step (`audit.audit_gaussian_step(..., mechanism=self)`). Default: its
    noise is one fresh Gaussian draw per step (`audit.gaussian_step_scores`)."""
    return audit.gaussian_step_scores(l2_clip_norm, noise_multiplier,
                                      included, seed=seed,
                                      canaries_per_step=canaries_per_step)

  # --- What it costs. ---
  def record(self, ledger, start: int, steps: int) -> None:
    """Records phase steps [start, start + steps) in a `PrivacyLedger`."""
    raise NotImplementedError

  def epsilon(self) -> float:
    """Epsilon of the whole phase alone (at its delta and accountant)."""
    raise NotImplementedError

  def calibrate(self, target_epsilon: float) -> float:
    """The smallest sigma (to 1e-3) whose `epsilon` meets the target."""
    raise NotImplementedError

  def calibrated(self, target_epsilon: float) -> "Mechanism":
    """This mechanism with sigma = `calibrate(target_epsilon)`."""
    return dataclasses.replace(
        self, noise_multiplier=float(self.calibrate(target_epsilon)))

  # --- What it says and keeps. ---
  def settings(self) -> dict[str, Any]:
    """Public run-level facts for results.json: its name and knobs."""
    return dict(mechanism=self.name,
                **{k: getattr(self, k) for k in self.knobs})

  def describe(self) -> dict[str, Any]:
    """Public per-phase facts beyond sigma and q (e.g. BLT's strategy)."""
    return {}

  def signature(self) -> dict[str, Any]:
    """What a resumed phase must keep (saved in each checkpoint)."""
    return dict(mechanism=self.name, noise_multiplier=self.noise_multiplier,
                **{k: getattr(self, k) for k in self.knobs})

  def check_resumable(self, saved: dict, phase_step: int,
                      phase_name: str) -> None:
    """Raises a ConfigError if a checkpoint `phase_step` steps into this
    phase, with `saved` = its `signature()`, cannot continue under this
    mechanism: a per-step mechanism (`correlated` False) may change its
    values (the ledger records each step's own), a correlated one is
    accounted for the values its phase started with."""
    check_signature(saved, self.signature(), phase_step, phase_name,
                    correlated=self.correlated, fields=self.fields)


_BASE_FIELDS = dict(mechanism="privacy.mechanism",
                    noise_multiplier="privacy.noise_multiplier",
                    steps="train.steps")


def check_signature(saved: dict, now: dict, phase_step: int,
                    phase_name: str, *, correlated: bool = True,
                    fields: Mapping[str, str] = ()) -> None:
  """`Mechanism.check_resumable` of signatures `saved` and `now` ({}: a
  public phase)."""
  if not saved or not phase_step or saved == now or (
      not correlated and saved.get("mechanism") == now.get("mechanism")):
    return
  fields = dict(_BASE_FIELDS, **dict(fields))
  keys = list(now) + [k for k in saved if k not in now]
  key = next(k for k in keys if saved.get(k) != now.get(k))
  fail(fields.get(key, f"privacy.{key}"), now.get(key),
       f"the checkpoint of phase {phase_name!r} (step {phase_step} of it) ran "
       f"with {saved.get(key)!r}; {saved.get('mechanism')} noise is "
       "correlated across the phase's steps and accounted for the values it "
       "started with (sigma comes from privacy.target_epsilon and delta "
       "unless set). Resume with the checkpoint's values, or start a new "
       "workdir")
