"""Tests of privacy/tuning.py: the best-of-K RDP bounds (Papernot & Steinke)."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import special

from dpjax import privacy
from dpjax.privacy import tuning

ORDERS = np.asarray(tuning.ORDERS)
DELTA = 1e-5


def _gaussian_rdp(sigma):
  """RDP of the Gaussian mechanism (sensitivity 1): lambda / (2 sigma^2)."""
  return ORDERS / (2 * sigma ** 2)


@pytest.mark.parametrize("eta", [-0.5, 0.0, 0.5, 1.0, 3.0])
def test_tnb_pmf_sums_to_one_with_the_closed_form_mean(eta):
  d = tuning.TruncatedNegativeBinomial(eta, 0.2)
  p = np.array([d.pmf(k) for k in range(1, 400)])
  assert d.pmf(0) == 0
  assert p.sum() == pytest.approx(1.0, abs=1e-9)
  assert (np.arange(1, 400) * p).sum() == pytest.approx(d.mean, rel=1e-9)


def test_tnb_eta_one_is_geometric_and_eta_zero_logarithmic():
  g = tuning.TruncatedNegativeBinomial(1.0, 0.25)
  for k in range(1, 10):
    assert g.pmf(k) == pytest.approx(0.25 * 0.75 ** (k - 1))
  assert g.mean == pytest.approx(4.0)
  log = tuning.TruncatedNegativeBinomial(0.0, 0.25)
  for k in range(1, 10):
    assert log.pmf(k) == pytest.approx(0.75 ** k / (k * math.log(4)))
  # eta -> 0 is continuous (the closed form has a removable singularity).
  assert tuning.TruncatedNegativeBinomial(1e-7, 0.25).mean == pytest.approx(
      log.mean, rel=1e-5)


def test_from_mean_inverts_the_mean_conservatively():
  for eta in (0.0, 0.5, 1.0, 2.0):
    d = tuning.TruncatedNegativeBinomial.from_mean(eta, 7.0)
    assert d.mean <= 7.0 and d.mean == pytest.approx(7.0, rel=1e-9)


def test_sampling_matches_the_distribution():
  rng = np.random.default_rng(0)
  d = tuning.TruncatedNegativeBinomial(0.5, 0.2)
  draws = np.array([d.sample(rng) for _ in range(20000)])
  assert draws.min() >= 1
  assert draws.mean() == pytest.approx(d.mean, rel=0.05)
  assert np.mean(draws == 1) == pytest.approx(d.pmf(1), abs=0.01)


def test_tnb_bound_is_theorem_2_at_the_best_lambda_hat():
  """eps' = eps + (1+eta)(1-1/l^)eps^ + (1+eta)log(1/g)/l^ + log E[K]/(l-1),
  evaluated by hand for the Gaussian mechanism (RDP linear in lambda)."""
  rdp = _gaussian_rdp(4.0)
  d = tuning.TruncatedNegativeBinomial(0.5, 0.1)
  got = tuning.tnb_rdp(ORDERS, rdp, d)
  hat = [(1 + d.eta) * ((1 - 1 / lh) * e + math.log(1 / d.gamma) / lh)
         for lh, e in zip(ORDERS, rdp)]
  want = rdp + min(hat) + math.log(d.mean) / (ORDERS - 1)
  want = np.minimum.accumulate(want[::-1])[::-1]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_poisson_bound_is_theorem_6():
  rdp = _gaussian_rdp(4.0)
  mu, lam = 3.0, 8.0
  i = int(np.where(ORDERS == lam)[0][0])
  eps_hat = math.log(1 + 1 / (lam - 1))
  delta_hat, _ = dp_accounting.rdp.rdp_privacy_accountant.compute_delta(
      ORDERS, rdp, eps_hat)
  got = tuning.poisson_rdp(ORDERS, rdp, tuning.Poisson(mu))[i]
  assert got == pytest.approx(rdp[i] + mu * delta_hat + math.log(mu) / 7)
  with pytest.raises(ValueError):
    tuning.Poisson(0.5)


@pytest.mark.parametrize("dist", [
    tuning.Poisson(5.0), tuning.Poisson(1.0),
    tuning.TruncatedNegativeBinomial.from_mean(1.0, 5.0),
    tuning.TruncatedNegativeBinomial.from_mean(0.0, 5.0),
    tuning.TruncatedNegativeBinomial.from_mean(2.0, 10.0)])
def test_matches_dp_accounting_repeat_and_select(dist):
  """dp_accounting implements the same theorems (RepeatAndSelectDpEvent)."""
  event = privacy.dp_event(1.0, 0.05, 200)
  mine = tuning.search_epsilon(ORDERS, tuning.rdp_curve(event), dist, DELTA)
  acc = dp_accounting.rdp.RdpAccountant(list(ORDERS))
  shape = math.inf if isinstance(dist, tuning.Poisson) else dist.eta
  acc.compose(dp_accounting.dp_event.RepeatAndSelectDpEvent(
      event, dist.mean, shape))
  assert mine["epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)


def test_search_epsilon_grows_with_the_expected_number_of_trials():
  rdp = tuning.dpsgd_rdp(1.0, 0.05, 200)
  single = tuning.rdp_to_epsilon(ORDERS, rdp, DELTA)[0]
  for make in (tuning.Poisson,
               lambda m: tuning.TruncatedNegativeBinomial.from_mean(1.0, m)):
    eps = [tuning.search_epsilon(ORDERS, rdp, make(m), DELTA)["epsilon"]
           for m in (1.5, 2, 4, 8, 16)]
    assert single < eps[0] and all(np.diff(eps) > 0)


def _best_of_k(pmf_q, pgf, k0_mass):
  """pmf of max of K i.i.d. draws of pmf_q over {bottom, 0..m-1}:
  P[A <= y] = E[F(y)^K] = pgf(F(y)); bottom (K = 0) has mass k0_mass."""
  cdf = pgf(np.cumsum(pmf_q))
  return np.concatenate([[k0_mass], np.diff(np.concatenate([[k0_mass], cdf]))])


def _renyi(p, q, lam):
  m = (p > 0) | (q > 0)
  with np.errstate(divide="ignore"):
    return float(special.logsumexp(lam * np.log(p[m]) + (1 - lam) *
                                   np.log(q[m])) / (lam - 1))


def _hockey(p, q, eps):
  return float(np.maximum(p - math.exp(eps) * q, 0).sum())


@pytest.mark.parametrize("dist", [
    tuning.Poisson(1.0), tuning.Poisson(4.0),
    tuning.TruncatedNegativeBinomial(1.0, 0.25),
    tuning.TruncatedNegativeBinomial(0.0, 0.05),
    tuning.TruncatedNegativeBinomial(-0.5, 0.02)])
def test_bound_holds_for_the_exact_best_of_k_of_a_toy_mechanism(dist):
  """Q = a score with discretised Gaussian noise (sigma 2, neighbours shift
  its mean by 1); A = the best of K runs. Its exact Renyi divergences and
  its exact delta at the reported epsilon are below the bounds, while the
  search really leaks more than one run (tuning is not free)."""
  grid = np.arange(-12, 14)  # Tails ~1e-8: exact differences of CDFs.
  q0 = np.exp(-grid ** 2 / 8.0)
  q1 = np.exp(-(grid - 1.0) ** 2 / 8.0)
  q0, q1 = q0 / q0.sum(), q1 / q1.sum()
  orders = ORDERS[ORDERS <= 64]
  q_rdp = np.array([max(_renyi(q0, q1, a), _renyi(q1, q0, a))
                    for a in orders])
  if isinstance(dist, tuning.Poisson):
    pgf, k0 = lambda x: np.exp(dist.mean * (x - 1)), math.exp(-dist.mean)
  else:
    p = np.array([dist.pmf(k) for k in range(1, 3000)])
    k = np.arange(1, 3000)
    pgf, k0 = lambda x: (p * np.power.outer(x, k)).sum(-1), 0.0
  a0, a1 = _best_of_k(q0, pgf, k0), _best_of_k(q1, pgf, k0)
  assert a0.sum() == pytest.approx(1.0) and a1.sum() == pytest.approx(1.0)
  bound = tuning.search_rdp(orders, q_rdp, dist)
  exact = np.array([max(_renyi(a0, a1, a), _renyi(a1, a0, a))
                    for a in orders])
  assert np.all(exact <= bound + 1e-9)
  eps = tuning.search_epsilon(orders, q_rdp, dist, DELTA)["epsilon"]
  assert max(_hockey(a0, a1, eps), _hockey(a1, a0, eps)) <= DELTA
  # With several runs expected, the search leaks more than one run.
  if dist.mean >= 4:
    assert exact[orders == 8.0][0] > q_rdp[orders == 8.0][0]


def test_results_rdp_reads_phases_and_segments_as_run():
  results = {"private": True, "mechanism": "dpsgd", "bands": 1,
             "pre/private": False, "pre/steps": 50,
             "dp/private": True, "dp/steps": 100,
             "dp/noise_multiplier": [[1.0, 60], [2.0, 40]],
             "dp/sampling_rate": [[0.01, 30], [0.02, 70]]}
  want = (tuning.dpsgd_rdp(1.0, 0.01, 30) + tuning.dpsgd_rdp(1.0, 0.02, 30)
          + tuning.dpsgd_rdp(2.0, 0.02, 40))
  np.testing.assert_allclose(tuning.results_rdp(results), want, rtol=1e-9)
  ledger = privacy.PrivacyLedger(10000, DELTA, accountant="rdp")
  ledger.record(1.0, 0.01, 30)
  ledger.record(1.0, 0.02, 30)
  ledger.record(2.0, 0.02, 40)
  # Same events; a different order grid (ours is coarser: never smaller).
  eps = tuning.rdp_to_epsilon(ORDERS, want, DELTA)[0]
  assert ledger.epsilon() <= eps <= 1.02 * ledger.epsilon()
  assert not tuning.results_rdp({"private": False}).any()
  bandmf = dict(results, mechanism="bandmf", bands=4,
                **{"dp/noise_multiplier": 1.0, "dp/sampling_rate": 0.01})
  np.testing.assert_allclose(tuning.results_rdp(bandmf),
                             tuning.dpsgd_rdp(1.0, 0.04, 25), rtol=1e-9)
  # Truncated Poisson is not DP-SGD's event, and has no RDP curve.
  with pytest.raises(ValueError, match="truncated_poisson"):
    tuning.results_rdp(dict(results, mechanism="truncated_poisson"))


def test_calibrate_trial_epsilon_meets_the_search_target():
  dist = tuning.Poisson(4.0)
  curve = lambda e: _gaussian_rdp(4.0 / e)  # Grows with e.
  search = lambda e: tuning.search_epsilon(ORDERS, curve(e), dist,
                                           DELTA)["epsilon"]
  calls = []
  counted = lambda e: calls.append(e) or curve(e)
  for rtol in (1e-2, 1e-3):
    calls.clear()
    e = tuning.calibrate_trial_epsilon(4.0, DELTA, dist, counted, rtol=rtol)
    assert (1 - rtol) * 4.0 <= search(e) <= 4.0 < search(e * 1.05)
    assert e < 4.0 and len(calls) <= 8  # Each call calibrates: seconds.
