"""`PhasePlan`: one phase as the loop (and `dpjax.plan`) runs it.

`resolve_phases` turns the recipe's phases into plans: the recipe's `Phase`
(never changed) plus what the loop resolved from the config: N after
canaries, the privacy settings with the phase's mechanism (sigma, q, its
sampler and noise), and the clipped-sum function with its sensitivity.
"""

import dataclasses
from typing import Any, Sequence

import ml_collections

from dpjax import errors
from dpjax import privacy
from dpjax.train import augmult as augmult_lib
from dpjax.train import privacy_settings
from dpjax.train import step as step_lib
from dpjax.train import task as task_lib


def _fail(field: str, value, fix: str):
  raise errors.config_error(field, value, fix)


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """One phase as the loop runs it: the recipe's `Phase` (unchanged) plus
  what the loop resolved. Its name, privacy, steps and batch size are
  properties; anything else of the recipe's is `plan.phase.<field>`.

  Attributes:
    phase: the recipe's phase.
    source: its records, with any audit canaries appended.
    num_examples: N, privacy units of `source` (examples, or users).
    privacy: resolved DP settings (None for a public phase).
    sum_fn: the clipped-sum function of the step; for a private phase a
      `privacy.clipping.BoundedSum`, whose sensitivity the noise reads.
    ema_decay, ema_warmup: train.ema_decay / ema_warmup (0: no EMA).
  """
  phase: task_lib.Phase
  source: Any
  num_examples: int
  privacy: privacy_settings.PrivacySettings | None
  sum_fn: Any
  ema_decay: float = 0.0
  ema_warmup: bool = True

  @property
  def name(self) -> str:
    return self.phase.name

  @property
  def private(self) -> bool:
    return self.phase.private

  @property
  def steps(self) -> int:
    return self.phase.steps

  @property
  def batch_size(self) -> int:
    """The expected batch q*N."""
    return self.phase.batch_size

  @property
  def mechanism(self) -> privacy.mechanisms.Mechanism | None:
    """The phase's DP mechanism (None: a public phase)."""
    return self.privacy.mechanism if self.privacy else None

  @property
  def sampler(self) -> privacy.sampling.Sampler:
    """Which rows each step reads: the mechanism's, or Poisson at rate q
    for a public phase."""
    return (self.mechanism.sampler() if self.mechanism
            else privacy.sampling.Poisson())

  @property
  def sampling_rate(self) -> float:
    """q = expected batch / N."""
    return self.phase.batch_size / self.num_examples

  @property
  def per_step_accounting(self) -> bool:
    """Whether each step is accounted on its own (public phases, and
    mechanisms without correlated noise): its sigma and q may then change
    between steps (a resumed phase)."""
    return not (self.mechanism and self.mechanism.correlated)

  def describe(self) -> dict:
    """Public facts of this phase for logs and results.json, keyed
    "<phase name>/<fact>"."""
    out = dict(private=self.private, steps=self.steps,
               batch_size=self.batch_size, num_examples=self.num_examples)
    if self.private:
      out.update(
          noise_multiplier=self.noise_multiplier,
          sampling_rate=self.sampling_rate,
          l2_clip_norm=self.privacy.l2_clip_norm,
          # The noise's scale: the sum function's bound per privacy unit.
          l2_sensitivity=self.l2_sensitivity, privacy_unit=self.unit,
          clipping=self.privacy.clipping)
      out.update(self.mechanism.describe())
    return {f"{self.name}/{k}": v for k, v in out.items()}

  def noise_signature(self) -> dict:
    """What a resumed private phase must keep (saved in each checkpoint):
    its mechanism's `signature()`. Empty for a public phase."""
    return self.mechanism.signature() if self.mechanism else {}

  def check_resumable(self, saved: dict, phase_step: int) -> None:
    """Raises a ConfigError if a checkpoint taken `phase_step` steps into
    this phase, with `saved` = its `noise_signature()`, cannot continue
    under this config (`Mechanism.check_resumable`)."""
    if self.mechanism:
      self.mechanism.check_resumable(saved, phase_step, self.name)
    else:
      privacy.mechanisms.base.check_signature(saved, {}, phase_step,
                                              self.name)

  @property
  def noise_multiplier(self) -> float:
    return self.privacy.noise_multiplier if self.privacy else 0.0

  @property
  def l2_sensitivity(self) -> float:
    """L2 bound of one privacy unit on the step's sum (0: public phase)."""
    return self.sum_fn.l2_sensitivity if self.privacy else 0.0

  @property
  def unit(self) -> str:
    """The privacy unit: "example" or "user" ("" for a public phase)."""
    return self.sum_fn.unit if self.privacy else ""

  def step_optimizer(self, noise_key=None, first_step: int = 0):
    """`train.step.phase_optimizer` of this phase: the mechanism's noise
    (private phases; sigma from it, q*N and the sum function's bound from
    this plan) chained with the phase's optimizer. `noise_key` and
    `first_step` only matter to `init` (the noise's root key and the count
    of its first update)."""
    noise = None
    if self.mechanism:
      noise = self.mechanism.noise(
          self.sum_fn, float(self.phase.batch_size), seed=noise_key,
          initial_count=first_step)
    return step_lib.phase_optimizer(self.phase.optimizer, noise=noise,
                                    ema_decay=self.ema_decay,
                                    ema_warmup=self.ema_warmup)


def resolve_phases(config: ml_collections.ConfigDict,
                   phases: Sequence[task_lib.Phase],
                   canaries: Any = None) -> list[PhasePlan]:
  """The `PhasePlan` of every phase (the loop and `dpjax.plan` both call this).

  Args:
    config: the run config (reads `privacy`, `train.inner_microbatch`).
    phases: the recipe's phases.
    canaries: None, or what `train.canaries.insert` returned: its
      `phase_index` phase reads `canaries.source` (the canaries appended),
      with `canaries.num_inserted` more privacy units.

  Raises:
    ValueError: a private phase's own `clipped_sum_fn` states no
      sensitivity (it must be a `privacy.clipping.BoundedSum`).
  """
  out = []
  k = int(config.train.get("augmult", 1))
  if k > 1 and canaries is not None:
    raise errors.config_error(
        "train.augmult", k, "the canary audit (audit.num_canaries > 0) "
        "scores single copies: set train.augmult=1 for an audited run")
  for i, phase in enumerate(phases):
    phase = augmult_lib.apply(phase, k)
    source, n = phase.source, phase.num_examples
    if canaries is not None and canaries.phase_index == i:
      source, n = canaries.source, n + canaries.num_inserted
    s = None
    if phase.private:
      with errors.config_block("privacy"):  # e.g. calibration's ValueError.
        s = privacy_settings.from_config(
            config.privacy, num_examples=n, batch_size=phase.batch_size,
            steps=phase.steps)
    sum_fn = step_lib.phase_sum_fn(phase, s, config.train.inner_microbatch)
    if phase.private and not isinstance(sum_fn, privacy.clipping.BoundedSum):
      raise ValueError(
          f"phase {phase.name}: its clipped_sum_fn states no sensitivity; "
          "return a privacy.clipping.BoundedSum(fn, l2_sensitivity, unit)")
    if s is not None and not s.mechanism.poisson and (
        phase.make_batches is not None or phase.clipped_sum_fn is not None):
      _fail("privacy.mechanism", s.mechanism.name, f"phase {phase.name!r} "
            f"samples users with its own batching: {s.mechanism.name}'s "
            "sampler is example-level; use privacy.mechanism=\"dpsgd\"")
    out.append(PhasePlan(phase, source, n, s, sum_fn,
                         ema_decay=float(config.train.get("ema_decay", 0.0)),
                         ema_warmup=bool(config.train.get("ema_warmup",
                                                          True))))
  return out
