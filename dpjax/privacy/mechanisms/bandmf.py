"""BandMF: noise correlated over `privacy.bands` = b steps, b-cyclic Poisson
sampling, accounted as DP-SGD at rate q b over ceil(T / b) steps.

The noise, its strategy and the proof are in `privacy.bandmf`; the sampler
is `sampling.Cyclic(b)` (each example in its own secret uniform partition,
step t samples partition t mod b at rate q b), the sampling that proof
assumes. b = 1 is DP-SGD exactly, and resolves to `DpSgd`.
"""

import dataclasses

import numpy as np

from dpjax.privacy import audit
from dpjax.privacy import bandmf
from dpjax.privacy import sampling
from dpjax.privacy.mechanisms import base
from dpjax.privacy.mechanisms import dpsgd


@dataclasses.dataclass(frozen=True)
class BandMF(base.Mechanism):
  """BandMF with b = `bands` (module doc)."""
  bands: int = 2
  name = "bandmf"
  knobs = dict(bands=1)
  correlated = True
  fields = dict(bands="privacy.bands")

  @classmethod
  def resolve(cls, cfg, **kwargs):
    if cfg.get("bands", 1) == 1:  # One band: DP-SGD, its noise and state.
      return dpsgd.DpSgd.resolve(cfg, **kwargs)
    return super().resolve(cfg, **kwargs)

  @classmethod
  def own_knobs(cls, cfg, *, steps, batch_size, num_examples, accountant):
    return dict(bands=base.check_cycle(
        "privacy.bands", cfg.get("bands", 1), steps=steps,
        batch_size=batch_size, num_examples=num_examples))

  def sampler(self) -> sampling.Sampler:
    return sampling.Cyclic(self.bands)

  def noise(self, sum_fn, expected_batch_size, seed=None, initial_count=0):
    return bandmf.bandmf_noise(sum_fn, self.noise_multiplier,
                               expected_batch_size, self.bands, seed=seed,
                               initial_count=initial_count)

  def noise_covariance(self):
    inverse = np.linalg.inv(bandmf.strategy_matrix(self.bands, self.steps))
    return inverse @ inverse.T  # w = C^{-1} z.

  def canary_scores(self, l2_clip_norm, noise_multiplier, included, *,
                    canaries_per_step, seed):
    return audit.bandmf_step_scores(l2_clip_norm, noise_multiplier,
                                    self.bands, included, seed=seed,
                                    canaries_per_step=canaries_per_step)

  def records(self, start: int, steps: int) -> int:
    """Ledger entries of phase steps [start, start + steps): one per b
    steps (those with t % b == 0, at rate q b: an example's partition is
    sampled at most that often)."""
    b = self.bands
    return -(-(start + steps) // b) - (-(-start // b))

  def record(self, ledger, start, steps):
    ledger.record(self.noise_multiplier, self.sampling_rate * self.bands,
                  self.records(start, steps))

  def epsilon(self):
    return bandmf.epsilon(self.noise_multiplier, self.sampling_rate,
                          self.steps, self.delta, self.bands,
                          accountant=self.accountant)

  def calibrate(self, target_epsilon):
    return bandmf.calibrate_noise_multiplier(
        target_epsilon, self.sampling_rate, self.steps, self.delta,
        self.bands, accountant=self.accountant)


MECHANISM = BandMF
