"""Tests for dpjax.privacy.ledger."""

import json
import math
import time

import dp_accounting
import pytest

from dpjax.privacy import accounting
from dpjax.privacy import ledger as ledger_lib

N, Q, SIGMA = 60000, 256 / 60000, 1.1


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_single_event_matches_accounting(accountant):
  led = ledger_lib.PrivacyLedger(N, accountant=accountant)
  assert led.delta == pytest.approx(N ** -1.1)  # Default strictly < 1/N.
  assert led.delta < 1 / N
  for _ in range(5):
    led.record(SIGMA, Q, steps=200)
  assert led.steps == 1000 and len(led.entries) == 1
  eps = accounting.epsilon(SIGMA, Q, 1000, N ** -1.1, accountant)
  assert led.epsilon() == pytest.approx(eps, rel=1e-6)
  assert led.epsilon(1e-3) < led.epsilon()


def test_json_round_trip():
  led = ledger_lib.PrivacyLedger(N, delta=1e-5)
  led.record(SIGMA, Q, steps=100)
  led.record(0.8, 2 * Q, steps=50)
  led.record(SIGMA, Q, steps=10, sampling="truncated_poisson",
             max_batch_size=400)
  led.record_public(7)
  d = json.loads(json.dumps(led.to_dict()))
  back = ledger_lib.PrivacyLedger.from_dict(d)
  assert back.to_dict() == led.to_dict()
  assert back.steps == 160 and back.public_steps == 7
  # Epsilon survives the round trip (Poisson-only ledger: fast PLD).
  led = ledger_lib.PrivacyLedger(N, delta=1e-5)
  led.record(SIGMA, Q, steps=100)
  led.record(0.8, 2 * Q, steps=50)
  back = ledger_lib.PrivacyLedger.from_dict(
      json.loads(json.dumps(led.to_dict())))
  assert back.epsilon() == pytest.approx(led.epsilon(), rel=1e-12)


def test_multi_event_matches_composed_event():
  led = ledger_lib.PrivacyLedger(N, delta=1e-5)
  led.record(SIGMA, Q, steps=300)
  led.record(0.9, Q / 2, steps=200)
  led.record(SIGMA, Q, steps=100)
  assert len(led.entries) == 3
  event = dp_accounting.ComposedDpEvent([
      accounting.dp_event(SIGMA, Q, 300), accounting.dp_event(0.9, Q / 2, 200),
      accounting.dp_event(SIGMA, Q, 100)])
  assert led.epsilon() == pytest.approx(
      accounting.event_epsilon(event, 1e-5), rel=1e-3)


def test_budget_stop_and_epsilon_after():
  led = ledger_lib.PrivacyLedger(N, delta=1e-5)
  led.record(SIGMA, Q, steps=1000)
  before = led.epsilon()
  after = led.epsilon_after(SIGMA, Q, 500)
  assert after > before
  assert led.steps == 1000 and led.epsilon() == before  # Unchanged.
  assert led.would_exceed(before * 1.0001, SIGMA, Q, 500)
  assert not led.would_exceed(after * 1.0001, SIGMA, Q, 500)
  led.record(SIGMA, Q, steps=500)
  assert led.epsilon() == pytest.approx(after, rel=1e-9)


def test_non_private_and_public_steps():
  led = ledger_lib.PrivacyLedger(N)
  assert led.epsilon() == 0.0
  led.record_public(100)
  assert led.epsilon() == 0.0 and led.steps == 0
  led.record(SIGMA, Q, steps=10)
  led.record(0.0, Q, steps=1)
  assert led.epsilon() == math.inf


def test_recompute_is_cached_and_cheap():
  led = ledger_lib.PrivacyLedger(N, delta=1e-5)
  led.record(0.9, Q, steps=2000)
  led.record(SIGMA, Q, steps=1000)
  led.epsilon()
  start = time.perf_counter()
  led.epsilon()  # Exact cache hit.
  assert time.perf_counter() - start < 0.05
  start = time.perf_counter()
  for _ in range(5):
    led.record(SIGMA, Q, steps=10)
    led.epsilon()
  # Only the last entry is recomposed from its cached one-step PLD.
  assert time.perf_counter() - start < 5.0


def test_unsupported_sampling_raises():
  with pytest.raises(ValueError, match="accountant"):
    ledger_lib.PrivacyLedger(N).record(SIGMA, Q, 1, "without_replacement")
  led = ledger_lib.PrivacyLedger(N, accountant="rdp")
  led.record(SIGMA, Q, 10, "without_replacement")
  assert 0 < led.epsilon() < math.inf


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_gaussian_entries_add_rho_and_compose_with_dp_sgd(accountant):
  """record_gaussian: rho adds up (Gaussian mechanisms compose exactly so),
  all Gaussian entries are one GaussianDpEvent(rho^-1/2), composed with the
  DP-SGD entries; the ledger serialises and resumes them."""
  led = ledger_lib.PrivacyLedger(N, delta=1e-5, accountant=accountant)
  for _ in range(4):
    led.record_gaussian(0.0625, steps=1)  # Four quarters of sigma = 2.
  assert led.steps == 4 and led.rho == 0.25 and len(led.entries) == 1
  gauss = dp_accounting.GaussianDpEvent(2.0)
  assert led.epsilon() == pytest.approx(
      accounting.event_epsilon(gauss, 1e-5, accountant), rel=1e-9)
  led.record(SIGMA, Q, steps=100)
  led.record_gaussian(0.25, steps=2)  # Another phase: rho 0.5 in all.
  assert [e.get("kind") for e in led.entries] == ["gaussian", None,
                                                  "gaussian"]
  want = accounting.event_epsilon(dp_accounting.ComposedDpEvent([
      dp_accounting.GaussianDpEvent(0.5 ** -0.5),
      accounting.dp_event(SIGMA, Q, 100)]), 1e-5, accountant)
  assert led.epsilon() == pytest.approx(want, rel=1e-3)
  back = ledger_lib.PrivacyLedger.from_dict(json.loads(json.dumps(
      led.to_dict())))
  assert back.to_dict() == led.to_dict() and back.epsilon() == led.epsilon()
  other = led.copy()
  other.record_gaussian(1.0)
  assert other.epsilon() > led.epsilon() and led.rho == 0.5
  led.record_gaussian(0.0, steps=0)  # Nothing.
  assert led.steps == 106
  with pytest.raises(ValueError, match="rho >= 0"):
    led.record_gaussian(-1.0)
