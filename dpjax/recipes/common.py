"""Config -> plain objects for the generic loop (so privacy/ never sees configs).

Everything that reads `config.privacy` or `config.train` lives here, and so
does the validation of those blocks: errors name the field, the value and
the fix.
"""

import dataclasses
import math

from absl import logging
import ml_collections
import optax

from dpjax import privacy


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
  """Resolved DP-SGD settings of a private phase (plain values)."""
  enabled: bool
  l2_clip_norm: float
  noise_multiplier: float
  delta: float
  accountant: str
  clipping: str
  normalize_gamma: float
  target_epsilon: float
  method: str
  # How delta was set: "config" or "N^-1.1" (the default).
  delta_rule: str = "config"
  # TAN simulation: the reference run this one simulates (0 = not a sim).
  tan_reference_batch_size: int = 0
  tan_reference_noise_multiplier: float = 0.0

  @property
  def is_simulation(self) -> bool:
    return self.tan_reference_batch_size > 0


def _fail(field: str, value, fix: str):
  raise ValueError(f"config.{field}={value!r} is invalid: {fix}")


def privacy_from_config(cfg: ml_collections.ConfigDict, *, num_examples: int,
                        batch_size: int, steps: int) -> PrivacySettings:
  """Resolves sigma (given, calibrated, or TAN-scaled) and delta.

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
    _fail("privacy.sampling", cfg.sampling,
          'only "poisson" sampling is accounted by the training loop')
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
  sigma = cfg.noise_multiplier
  if ref_b:
    if ref_b < batch_size:
      _fail("privacy.tan_reference_batch_size", ref_b,
            f"the simulated reference batch must exceed train.batch_size="
            f"{batch_size}")
    ref_sigma = sigma if sigma > 0 else privacy.calibrate_noise_multiplier(
        cfg.target_epsilon, min(1.0, ref_b / num_examples), steps, delta,
        accountant=cfg.accountant)
    sigma = privacy.tan_simulation(ref_sigma, ref_b, batch_size)
  else:
    ref_sigma = 0.0
    if cfg.enabled and sigma <= 0:
      sigma = privacy.calibrate_noise_multiplier(
          cfg.target_epsilon, batch_size / num_examples, steps, delta,
          accountant=cfg.accountant)
  return PrivacySettings(
      enabled=cfg.enabled, l2_clip_norm=cfg.l2_clip_norm,
      noise_multiplier=float(sigma) if cfg.enabled else 0.0, delta=delta,
      accountant=cfg.accountant, clipping=cfg.clipping,
      normalize_gamma=cfg.normalize_gamma,
      delta_rule="config" if cfg.delta > 0 else "N^-1.1",
      target_epsilon=cfg.target_epsilon if cfg.enabled else math.inf,
      method=cfg.method, tan_reference_batch_size=ref_b,
      tan_reference_noise_multiplier=float(ref_sigma))


def resolve_phases(cfg: ml_collections.ConfigDict, phases
                   ) -> dict[str, PrivacySettings]:
  """{phase name: settings} of every private phase; sets each private
  phase's `noise_multiplier` to its resolved sigma (the loop and
  `dpjax.plan` resolve privacy through this one function)."""
  out = {}
  for phase in phases:
    if phase.private:
      s = privacy_from_config(cfg, num_examples=phase.num_examples,
                              batch_size=phase.batch_size, steps=phase.steps)
      phase.noise_multiplier = s.noise_multiplier
      out[phase.name] = s
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
