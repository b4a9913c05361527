"""Tests for dpjax.privacy.accounting, against dp_accounting directly."""

import math

import dp_accounting
import numpy as np
import pytest

from dpjax.privacy import accounting

Q, SIGMA, DELTA = 256 / 60000, 1.1, 1e-5
STEPS = 60 * 60000 // 256  # 60 MNIST epochs.


def _direct(accountant):
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          Q, dp_accounting.GaussianDpEvent(SIGMA)), STEPS)
  if accountant == "rdp":
    acc = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))
  else:
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  return acc.compose(event).get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_mnist_matches_dp_accounting(accountant):
  eps = accounting.epsilon(SIGMA, Q, STEPS, DELTA, accountant)
  assert eps == pytest.approx(_direct(accountant), rel=1e-6)
  assert 2.0 < eps < 3.0  # Abadi et al. report ~2-2.6 for this setting.


def test_pld_tighter_than_rdp_and_default_rdp_orders():
  pld = accounting.epsilon(SIGMA, Q, STEPS, DELTA, "pld")
  rdp = accounting.epsilon(SIGMA, Q, STEPS, DELTA, "rdp")
  assert pld <= rdp
  # Our order grid is at least as tight as dp_accounting's default orders.
  default = dp_accounting.rdp.RdpAccountant().compose(
      accounting.dp_event(SIGMA, Q, STEPS)).get_epsilon(DELTA)
  assert rdp <= default + 1e-9


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_monotone(accountant):
  eps = lambda **kw: accounting.epsilon(
      **{**dict(noise_multiplier=1.0, sampling_rate=0.01, steps=500,
                delta=1e-5, accountant=accountant), **kw})
  base = eps()
  assert eps(noise_multiplier=1.5) < base < eps(noise_multiplier=0.8)
  assert eps(steps=250) < base < eps(steps=1000)
  assert eps(sampling_rate=0.005) < base < eps(sampling_rate=0.02)
  assert eps(delta=1e-3) < base < eps(delta=1e-7)


def test_edge_cases():
  assert accounting.epsilon(0.0, 0.01, 10, 1e-5) == math.inf
  assert accounting.epsilon(0.0, 0.01, 10, 1e-5, "rdp") == math.inf
  assert accounting.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
  with pytest.raises(ValueError, match="accountant"):
    accounting.epsilon(1.0, 0.01, 10, 1e-5, accountant="gdp")


@pytest.mark.parametrize("accountant,target", [("pld", 2.0), ("rdp", 8.0)])
def test_calibrate_inverts_epsilon(accountant, target):
  sigma = accounting.calibrate_noise_multiplier(target, Q, STEPS, DELTA,
                                                accountant)
  eps = accounting.epsilon(sigma, Q, STEPS, DELTA, accountant)
  assert eps <= target
  assert eps == pytest.approx(target, rel=0.01)


def test_truncated_poisson_pld():
  n = 60000
  full = accounting.epsilon(SIGMA, Q, 1000, DELTA)
  # Generous truncation is (numerically) Poisson; tight truncation differs.
  loose = accounting.epsilon(SIGMA, Q, 1000, DELTA,
                             sampling="truncated_poisson", num_examples=n,
                             max_batch_size=400)
  assert loose == pytest.approx(full, rel=1e-3)
  event = accounting.dp_event(SIGMA, Q, 10, "truncated_poisson", n, 300)
  assert isinstance(event.event,
                    dp_accounting.TruncatedSubsampledGaussianDpEvent)
  with pytest.raises(ValueError, match="pld"):
    accounting.epsilon(SIGMA, Q, 10, DELTA, "rdp", "truncated_poisson", n,
                       300)
  with pytest.raises(ValueError, match="max_batch_size"):
    accounting.dp_event(SIGMA, Q, 10, "truncated_poisson", n)


def test_without_replacement_rdp_only():
  n = 60000
  eps = accounting.epsilon(SIGMA, Q, STEPS, DELTA, "rdp",
                           "without_replacement", num_examples=n)
  direct = dp_accounting.rdp.RdpAccountant(
      list(accounting.WOR_RDP_ORDERS),
      dp_accounting.NeighboringRelation.REPLACE_ONE).compose(
          dp_accounting.SelfComposedDpEvent(
              dp_accounting.SampledWithoutReplacementDpEvent(
                  n, 256, dp_accounting.GaussianDpEvent(SIGMA)),
              STEPS)).get_epsilon(DELTA)
  assert eps == pytest.approx(direct, rel=1e-9)
  # Replace-one adjacency: about twice the add/remove-one Poisson epsilon.
  assert eps > accounting.epsilon(SIGMA, Q, STEPS, DELTA, "rdp")
  with pytest.raises(ValueError, match="rdp"):
    accounting.epsilon(SIGMA, Q, STEPS, DELTA, "pld", "without_replacement",
                       num_examples=n)


def test_tan():
  assert accounting.total_amount_of_noise(10.0, 1000) == pytest.approx(0.01)
  s = accounting.tan_simulation(10.0, 32768, 1024)
  assert accounting.total_amount_of_noise(s, 1024) == pytest.approx(
      accounting.total_amount_of_noise(10.0, 32768))


def test_rdp_orders_are_broad():
  orders = np.array(accounting.RDP_ORDERS)
  assert orders.min() <= 1.01 and orders.max() >= 256
  assert np.all(np.diff(orders) > 0)
