"""BLT: noise correlated over all of a phase's steps through
`privacy.blt_buffers` buffers, b-cyclic Poisson sampling with b =
`privacy.min_separation`, accounted as ONE Gaussian mechanism per phase (no
amplification by sampling).

The noise, its strategy (deterministic in (T, b, buffers), so a resumed run
rebuilds it) and the proof are in `privacy.blt`; the sampler is
`sampling.Cyclic(b)`, which that proof assumes. The ledger records the
phase's first t steps as a Gaussian mechanism of rho = Delta_t^2 /
(sigma Delta_n)^2 (`blt.ledger_rho`): they add up to 1 / sigma^2.
"""

import dataclasses

import numpy as np

from dpjax.privacy import audit
from dpjax.privacy import blt
from dpjax.privacy import sampling
from dpjax.privacy.mechanisms import base


@dataclasses.dataclass(frozen=True)
class Blt(base.Mechanism):
  """BLT with min separation b and d buffers (module doc)."""
  min_separation: int = 1
  blt_buffers: int = 4
  name = "blt"
  knobs = dict(min_separation=1, blt_buffers=4)
  correlated = True
  fields = dict(min_separation="privacy.min_separation",
                blt_buffers="privacy.blt_buffers",
                blt_theta="privacy.blt_buffers",
                blt_omega="privacy.blt_buffers",
                blt_sensitivity="privacy.blt_buffers")

  @classmethod
  def own_knobs(cls, cfg, *, steps, batch_size, num_examples, accountant):
    buffers = cfg.get("blt_buffers", 4)
    if not isinstance(buffers, int) or not 1 <= buffers <= 16:
      base.fail("privacy.blt_buffers", buffers, "use an integer in [1, 16] "
                "(BLT noise buffers, each the size of the params; default 4)")
    b = base.check_cycle("privacy.min_separation",
                         cfg.get("min_separation", 1), steps=steps,
                         batch_size=batch_size, num_examples=num_examples)
    return dict(min_separation=b, blt_buffers=buffers)

  @property
  def strategy(self) -> blt.Strategy:
    """(theta, omega) for this phase: deterministic in (T, b, d), cached."""
    return blt.optimize(self.steps, self.min_separation, self.blt_buffers)

  def sampler(self) -> sampling.Sampler:
    return sampling.Cyclic(self.min_separation)

  def noise(self, sum_fn, expected_batch_size, seed=None, initial_count=0):
    return blt.blt_noise(sum_fn, self.noise_multiplier, expected_batch_size,
                         self.strategy, self.steps, self.min_separation,
                         seed=seed, initial_count=initial_count)

  def noise_covariance(self):
    theta, omega = self.strategy  # w = Delta_n C^{-1} z.
    inverse = np.linalg.inv(blt.strategy_matrix(theta, omega, self.steps))
    scale = blt.sensitivity(theta, omega, self.steps, self.min_separation)
    return scale ** 2 * inverse @ inverse.T

  def canary_scores(self, l2_clip_norm, noise_multiplier, included, *,
                    canaries_per_step, seed):
    del canaries_per_step  # One residue class of the steps per canary set.
    return audit.blt_step_scores(l2_clip_norm, noise_multiplier,
                                 self.min_separation, included,
                                 steps=self.steps, seed=seed,
                                 buffers=self.blt_buffers)

  def record(self, ledger, start, steps):
    ledger.record_gaussian(blt.ledger_rho(
        self.strategy, self.steps, self.min_separation,
        self.noise_multiplier, start, steps), steps)

  def epsilon(self):
    return blt.epsilon(self.noise_multiplier, self.delta, self.accountant)

  def calibrate(self, target_epsilon):
    # One Gaussian mechanism per phase: independent of q, T and b.
    return blt.calibrate_noise_multiplier(target_epsilon, self.delta,
                                          accountant=self.accountant)

  def describe(self):
    theta, omega = self.strategy  # The strategy, and its Delta_n.
    return dict(blt_theta=list(theta), blt_omega=list(omega),
                blt_sensitivity=blt.sensitivity(
                    theta, omega, self.steps, self.min_separation))

  def signature(self):
    return dict(super().signature(), steps=self.steps)


MECHANISM = Blt
