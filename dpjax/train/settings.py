"""Config -> plain objects for the generic loop (so privacy/ never sees configs).

Everything the loop reads from `config.privacy` or `config.train` is resolved
here, and so is the validation of those blocks (errors name the field, the
value and the fix): the optimizer and schedule recipes call, and the
per-phase `PhasePlan` (sigma, q, N after canaries, the clipped-sum function
and its sensitivity) that the loop and `dpjax.plan` run. A recipe's `Phase`
is never changed.
"""

import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import ml_collections
import optax

from dpjax import errors
from dpjax import privacy
from dpjax.train import augmult as augmult_lib
from dpjax.train import step as step_lib
from dpjax.train import task as task_lib


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
  """Resolved DP settings of a private phase (plain values): the clipping,
  the budget and the phase's noise mechanism (sampler, noise, accounting)."""
  enabled: bool
  l2_clip_norm: float
  delta: float
  accountant: str
  clipping: str
  normalize_gamma: float
  target_epsilon: float
  method: str
  mechanism: privacy.mechanisms.Mechanism
  # How delta was set: "config" or "N^-1.1" (the default).
  delta_rule: str = "config"
  # TAN simulation: the reference run this one simulates (0 = not a sim).
  tan_reference_batch_size: int = 0
  tan_reference_noise_multiplier: float = 0.0

  @property
  def noise_multiplier(self) -> float:
    return self.mechanism.noise_multiplier

  @property
  def is_simulation(self) -> bool:
    return self.tan_reference_batch_size > 0


def _fail(field: str, value, fix: str):
  raise errors.config_error(field, value, fix)


def privacy_from_config(cfg: ml_collections.ConfigDict, *, num_examples: int,
                        batch_size: int, steps: int) -> PrivacySettings:
  """Resolves delta, the mechanism (`privacy.mechanisms.resolve`: its
  knobs) and sigma (given, calibrated by the mechanism, or TAN-scaled).

  Args:
    cfg: the `config.privacy` block (configs/common.py:privacy_block).
    num_examples: N, size of the private population (examples or users).
    batch_size: expected logical batch q*N of this run.
    steps: number of DP steps T.
  """
  if cfg.accountant not in ("pld", "rdp"):
    _fail("privacy.accountant", cfg.accountant, 'use "pld" or "rdp"')
  if cfg.clipping not in ("clip", "normalize"):
    _fail("privacy.clipping", cfg.clipping, 'use "clip" or "normalize"')
  if cfg.sampling != "poisson":
    _fail("privacy.sampling", cfg.sampling, 'only "poisson" sampling is '
          "accounted by the training loop (privacy.mechanism picks the "
          "batch selection)")
  if cfg.method not in ("vmap", "ghost", "auto"):
    _fail("privacy.method", cfg.method, 'use "vmap", "ghost" or "auto"')
  if cfg.enabled and cfg.l2_clip_norm <= 0:
    _fail("privacy.l2_clip_norm", cfg.l2_clip_norm, "use a positive norm")
  if not 0 < batch_size <= num_examples:
    _fail("train.batch_size", batch_size,
          f"the expected batch must be in (0, N={num_examples}]")
  # Default N^-1.1 < 1/N: delta = 1/N allows "release one record at random
  # in the clear", which is (0, 1/N)-DP; a default must be stricter.
  delta = cfg.delta if cfg.delta > 0 else float(num_examples) ** -1.1
  if cfg.delta > 0 and delta > (1.0 + 1e-9) / num_examples:
    _fail("privacy.delta", cfg.delta,
          f"delta must be <= 1/N = {1 / num_examples:.3g} (default -1: "
          f"N^-1.1 = {num_examples ** -1.1:.3g})")
  if cfg.delta > 0 and delta > (1.0 - 1e-9) / num_examples:
    logging.warning(
        "config.privacy.delta=%.3g = 1/N: this allows releasing one record "
        "in the clear; kept only to match a paper (default: N^-1.1).", delta)
  ref_b = cfg.tan_reference_batch_size
  sigma, ref_sigma = cfg.noise_multiplier, 0.0
  if ref_b:
    if ref_b < batch_size:
      _fail("privacy.tan_reference_batch_size", ref_b,
            f"the simulated reference batch must exceed train.batch_size="
            f"{batch_size}")
    ref_sigma = sigma if sigma > 0 else privacy.calibrate_noise_multiplier(
        cfg.target_epsilon, min(1.0, ref_b / num_examples), steps, delta,
        accountant=cfg.accountant)
    sigma = privacy.tan_simulation(ref_sigma, ref_b, batch_size)
  mechanism = privacy.mechanisms.resolve(
      cfg, noise_multiplier=sigma if cfg.enabled else 0.0,
      num_examples=num_examples, batch_size=batch_size, steps=steps,
      delta=delta, accountant=cfg.accountant)
  if ref_b and not mechanism.tan_simulation:
    _fail("privacy.mechanism", mechanism.name, "TAN simulation is DP-SGD's: "
          'use "dpsgd"')
  if cfg.enabled and sigma <= 0:
    mechanism = mechanism.calibrated(cfg.target_epsilon)
  return PrivacySettings(
      enabled=cfg.enabled, l2_clip_norm=cfg.l2_clip_norm, delta=delta,
      accountant=cfg.accountant, clipping=cfg.clipping,
      normalize_gamma=cfg.normalize_gamma,
      delta_rule="config" if cfg.delta > 0 else "N^-1.1",
      target_epsilon=cfg.target_epsilon if cfg.enabled else math.inf,
      method=cfg.method, mechanism=mechanism, tan_reference_batch_size=ref_b,
      tan_reference_noise_multiplier=float(ref_sigma))


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """One phase as the loop runs it: the recipe's `Phase` (unchanged) plus
  what the loop resolved. Attributes not listed here (name, private, steps,
  batch_size, transforms, optimizer, ...) are the phase's.

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
  privacy: PrivacySettings | None
  sum_fn: Any
  ema_decay: float = 0.0
  ema_warmup: bool = True

  def __getattr__(self, name: str):
    if name == "phase":  # Not yet set (e.g. while unpickling).
      raise AttributeError(name)
    return getattr(self.phase, name)

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
      s = privacy_from_config(config.privacy, num_examples=n,
                              batch_size=phase.batch_size, steps=phase.steps)
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


def schedule_from_config(t: ml_collections.ConfigDict, steps: int | None = None):
  """Linear warm-up then cosine over `decay_steps` (may exceed steps)."""
  steps = steps or t.steps
  decay = t.decay_steps or steps
  if t.warmup_steps >= decay:
    _fail("train.warmup_steps", t.warmup_steps,
          f"must be < the cosine horizon {decay} (train.decay_steps)")
  return optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, decay, end_value=0.0)


def optimizer_from_config(t: ml_collections.ConfigDict, steps: int | None = None
                          ) -> optax.GradientTransformation:
  """AdamW (decoupled decay on all params) or SGD(+momentum) with schedule."""
  lr = schedule_from_config(t, steps)
  if t.optimizer == "adamw":
    opt = optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  elif t.optimizer == "sgd":
    opt = optax.sgd(lr, momentum=t.momentum or None)
  else:
    _fail("train.optimizer", t.optimizer, 'use "adamw" or "sgd"')
  return opt


def validate_train(t: ml_collections.ConfigDict, num_devices: int):
  """Checks the train block against the device count."""
  for field in ("steps", "batch_size", "microbatch_size"):
    if t[field] <= 0:
      _fail(f"train.{field}", t[field], "must be positive")
  if t.microbatch_size % num_devices:
    _fail("train.microbatch_size", t.microbatch_size,
          f"must be a multiple of the {num_devices} devices")
  if t.inner_microbatch and (t.microbatch_size // num_devices) % t.inner_microbatch:
    _fail("train.inner_microbatch", t.inner_microbatch,
          "must divide the per-device microbatch")
  if t.dtype not in ("float32", "bfloat16"):
    _fail("train.dtype", t.dtype, 'use "float32" or "bfloat16"')
