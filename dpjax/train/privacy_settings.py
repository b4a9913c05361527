"""config.privacy -> `PrivacySettings` of a private phase (plain values).

Validation of the privacy block (errors name the field, the value and the
fix), delta, the phase's DP mechanism (`privacy.mechanisms.resolve`: its
knobs) and sigma (given, calibrated by the mechanism, or TAN-scaled), so
privacy/ never sees a config.
"""

import dataclasses
import math

from absl import logging
import ml_collections

from dpjax import errors
from dpjax import privacy


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


def from_config(cfg: ml_collections.ConfigDict, *, num_examples: int,
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
