"""Truncated Poisson DP-SGD: every step reads exactly `privacy.max_batch_size`
= B rows, accounted by PLD with the truncation.

Sampling (`TruncatedPoisson`): step t's Poisson draw at rate q
(`sampling.poisson_sample`, the same draw as DP-SGD's), truncated to a
uniformly random B-subset when larger, padded with masked rows to B when
smaller. The step then always costs B rows: its time no longer depends on
the realised batch size (a timing side channel of plain Poisson batches).
Noise: as DP-SGD (`noise.add_noise`, divided by the expected batch q N).

Formal guarantee (add/remove-one): each step is dp_accounting's
`TruncatedSubsampledGaussianDpEvent(N, q, B, sigma)` (the ledger's
"truncated_poisson" entries; PLD only, dp_accounting has no RDP bound for
it), composed over the steps. B well above q N (the default
`sampling.max_batch_size_for(N, q, 1e-6)`) makes truncation rare and the
epsilon that of DP-SGD up to a hair; B near q N costs far more epsilon.
"""

import dataclasses

from dpjax.privacy import accounting
from dpjax.privacy import sampling
from dpjax.privacy.mechanisms import base
from dpjax.privacy.mechanisms import dpsgd

_OVERFLOW = 1e-6  # Default B: P(a step's draw is truncated) <= this.


class TruncatedPoisson(sampling.Sampler):
  """Poisson at rate q truncated to (and padded to) `rows` = B rows."""

  def __init__(self, max_batch_size: int):
    self.rows = int(max_batch_size)

  def __call__(self, seed, step, num_examples, sampling_rate):
    batch = sampling.poisson_sample(seed, step, num_examples, sampling_rate,
                                    self.rows)
    return batch.indices[:batch.size]

  def fingerprint(self) -> dict:
    return {"max_batch_size": self.rows}


@dataclasses.dataclass(frozen=True)
class TruncatedPoissonDpSgd(dpsgd.DpSgd):
  """DP-SGD (its noise) on truncated Poisson batches of B rows (module
  doc)."""
  max_batch_size: int = 1
  name = "truncated_poisson"
  poisson = False  # Rows of its own batches, not plain Poisson ones.
  tan_simulation = False
  knobs = dict(max_batch_size=0)  # 0: max_batch_size_for(N, q, 1e-6).
  fields = dict(max_batch_size="privacy.max_batch_size")

  @classmethod
  def own_knobs(cls, cfg, *, steps, batch_size, num_examples, accountant):
    if accountant != "pld":
      base.fail("privacy.accountant", accountant, 'truncated Poisson '
                'sampling is accounted by "pld" only')
    b = cfg.get("max_batch_size", 0)
    if not isinstance(b, int) or not 0 <= b <= num_examples:
      base.fail("privacy.max_batch_size", b, f"use an integer in [1, N="
                f"{num_examples}] (rows read by every step), or 0 for "
                "max_batch_size_for(N, q, 1e-6)")
    if b == 0:
      b = sampling.max_batch_size_for(num_examples, batch_size / num_examples,
                                      _OVERFLOW)
    return dict(max_batch_size=b)

  def _event(self) -> dict:
    return dict(sampling="truncated_poisson", num_examples=self.num_examples,
                max_batch_size=self.max_batch_size)

  def sampler(self) -> sampling.Sampler:
    return TruncatedPoisson(self.max_batch_size)

  def record(self, ledger, start, steps):
    del start
    ledger.record(self.noise_multiplier, self.sampling_rate, steps,
                  "truncated_poisson", self.max_batch_size)

  def epsilon(self):
    return accounting.epsilon(self.noise_multiplier, self.sampling_rate,
                              self.steps, self.delta, self.accountant,
                              **self._event())

  def calibrate(self, target_epsilon):
    return accounting.calibrate_noise_multiplier(
        target_epsilon, self.sampling_rate, self.steps, self.delta,
        accountant=self.accountant, **self._event())

  def describe(self):
    return dict(max_batch_size=self.max_batch_size)


MECHANISM = TruncatedPoissonDpSgd
