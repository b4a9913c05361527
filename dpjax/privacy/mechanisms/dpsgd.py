"""DP-SGD: fresh Gaussian noise each step, Poisson sampling, amplified
accounting (Abadi et al. 2016).

Formal guarantee (add/remove-one): every example joins each step
independently at rate q (`sampling.Poisson`), the clipped sum (sensitivity
C) gets one N(0, (sigma C)^2) draw per coordinate (`noise.add_noise`), so
T steps are T Poisson-subsampled Gaussian mechanisms: `accounting.epsilon(
sigma, q, T, delta)`. The ledger records each step's own (sigma, q), so
they may change between steps (a resumed phase may continue under others).
"""

import dataclasses

from dpjax.privacy import accounting
from dpjax.privacy import noise as noise_lib
from dpjax.privacy import sampling
from dpjax.privacy.mechanisms import base


@dataclasses.dataclass(frozen=True)
class DpSgd(base.Mechanism):
  """DP-SGD (module doc)."""
  name = "dpsgd"
  poisson = True
  tan_simulation = True

  def sampler(self) -> sampling.Sampler:
    return sampling.Poisson()

  def noise(self, sum_fn, expected_batch_size, seed=None, initial_count=0):
    return noise_lib.add_noise(sum_fn, self.noise_multiplier,
                               expected_batch_size, seed=seed,
                               initial_count=initial_count)

  def record(self, ledger, start, steps):
    del start
    ledger.record(self.noise_multiplier, self.sampling_rate, steps)

  def epsilon(self):
    return accounting.epsilon(self.noise_multiplier, self.sampling_rate,
                              self.steps, self.delta, self.accountant)

  def calibrate(self, target_epsilon):
    return accounting.calibrate_noise_multiplier(
        target_epsilon, self.sampling_rate, self.steps, self.delta,
        accountant=self.accountant)


MECHANISM = DpSgd
