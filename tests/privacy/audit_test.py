"""Tests for dpjax.privacy.audit (statistics, canaries, white-box DP step)."""

import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.privacy import accounting
from dpjax.privacy import audit
from dpjax.privacy import audit_stats

DELTA = 1e-6
SIGMA = 1.25  # Gaussian mechanism: eps(delta=1e-6) = 3.80.


def test_doctests():
  results = [doctest.testmod(m) for m in (audit, audit_stats)]
  assert sum(r.attempted for r in results) > 10
  assert all(r.failed == 0 for r in results)


@pytest.mark.parametrize("k,n,alpha", [(0, 10, 0.05), (3, 10, 0.05),
                                       (10, 10, 0.1), (17, 1000, 0.01),
                                       (4990, 5000, 0.05)])
def test_clopper_pearson_matches_beta_quantiles(k, n, alpha):
  stats = pytest.importorskip("scipy.stats")
  lo = stats.beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
  hi = stats.beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
  for use_scipy in (True, False):
    got = audit.clopper_pearson(k, n, alpha, use_scipy=use_scipy)
    np.testing.assert_allclose(got, (lo, hi), rtol=1e-6, atol=1e-12)


def test_clopper_pearson_known_values():
  # Textbook: 0/n -> [0, 1 - (alpha/2)^(1/n)]; 5/10 at 95% -> [.1871, .8129].
  lo, hi = audit.clopper_pearson(0, 20, 0.05, use_scipy=False)
  assert lo == 0.0 and hi == pytest.approx(1 - 0.025**(1 / 20), rel=1e-9)
  np.testing.assert_allclose(audit.clopper_pearson(5, 10, 0.05),
                             (0.18709, 0.81291), atol=1e-5)


def test_clopper_pearson_coverage():
  rng = np.random.default_rng(0)
  p, n = 0.03, 200
  ks = rng.binomial(n, p, size=2000)
  cover = np.mean([lo <= p <= hi for lo, hi in
                   (audit.clopper_pearson(int(k), n, 0.1) for k in ks)])
  assert cover >= 0.9


def test_one_run_fallback_matches_scipy():
  pytest.importorskip("scipy.stats")
  for args in [(5000, 300, 280, 2.0, 1e-6), (100, 40, 40, 3.0, 1e-3)]:
    a = audit.one_run_p_value(*args, use_scipy=True)
    b = audit.one_run_p_value(*args, use_scipy=False)
    assert a == pytest.approx(b, rel=1e-8)


def test_one_run_pure_dp_closed_form():
  # delta = 0, all r guesses right: bound solves q^r = 1 - confidence.
  r = 50
  q = 0.05**(1 / r)
  assert audit.one_run_epsilon_lower_bound(r, r, 1000, 0.0) == pytest.approx(
      math.log(q / (1 - q)), abs=1e-6)


def test_one_run_bound_monotone_and_zero_at_chance():
  bounds = [audit.one_run_epsilon_lower_bound(1000, v, 20000, DELTA)
            for v in range(500, 1001, 50)]
  assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
  assert bounds[0] == 0.0 and bounds[-1] > 5.0
  # More canaries at the same delta -> larger delta penalty -> smaller bound.
  assert (audit.one_run_epsilon_lower_bound(1000, 950, 10**6, DELTA)
          < audit.one_run_epsilon_lower_bound(1000, 950, 10**4, DELTA))


def test_one_run_audit_random_scores_is_near_zero():
  included = audit.choose_included(20000, seed=3)
  scores = np.random.default_rng(4).normal(size=20000)
  r = audit.one_run_audit(scores, included, [100, 1000], [100, 1000], DELTA)
  assert r.empirical_epsilon < 0.3
  assert r.method == "one_run" and r.counts["num_k_candidates"] == 2


def test_threshold_bound_and_many_run_on_gaussians():
  assert audit.epsilon_lower_bound_threshold(500, 1000, 500, 1000, 1e-5) == 0
  # Symmetric direction: few included below t, many excluded below t.
  assert audit.epsilon_lower_bound_threshold(990, 1000, 500, 1000, 1e-5) > 3
  rng = np.random.default_rng(1)
  mu = 2.0  # Gaussian mechanism with sigma = 1/2: eps(1e-6) = 11.0.
  r = audit.many_run_audit(rng.normal(mu, 1, 100000), rng.normal(0, 1, 100000),
                           DELTA)
  assert 2.0 < r.empirical_epsilon < 11.0
  assert r.counts["threshold_selection"] == "holdout"
  assert r.counts["n_in"] == 50000  # Second half only.
  fixed = audit.many_run_audit(rng.normal(mu, 1, 100000),
                               rng.normal(0, 1, 100000), DELTA,
                               thresholds=[2.0, 3.0, 4.0])
  assert fixed.counts["threshold_selection"] == "bonferroni"
  assert 2.0 < fixed.empirical_epsilon < 11.0


def test_canary_helpers():
  params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
  c = audit.dirac_canaries(params, 17, seed=0, l2_norm=2.0)
  flat = np.concatenate([np.asarray(c["a"]).reshape(17, -1),
                         np.asarray(c["b"]).reshape(17, -1)], axis=1)
  np.testing.assert_allclose(flat @ flat.T, 4.0 * np.eye(17))
  r = audit.dirac_canaries(params, 4, seed=0, kind="random")
  np.testing.assert_allclose(audit.canary_scores(r, r), 1.0, rtol=1e-5)
  upd = jax.tree_util.tree_map(lambda x: x[3] * 5.0, c)
  scores = np.asarray(audit.canary_scores(upd, c))
  assert scores[3] == pytest.approx(10.0) and np.sum(scores != 0) == 1
  inc = audit.choose_included(100000, seed=1)
  assert abs(inc.mean() - 0.5) < 0.01
  np.testing.assert_array_equal(inc, audit.choose_included(100000, seed=1))
  labels = np.random.default_rng(0).integers(0, 10, 1000)
  new = audit.mislabel(labels, 10, seed=0)
  assert np.all(new != labels) and new.min() >= 0 and new.max() <= 9
  data = audit.insert_canaries({"x": np.zeros((5, 2)), "y": np.zeros(5)},
                               {"x": np.ones((4, 2)), "y": np.arange(4.)},
                               np.array([True, False, True, False]))
  assert data["x"].shape == (7, 2) and data["y"][5:].tolist() == [0.0, 2.0]


def test_gaussian_step_scores_without_noise_are_clipped_canaries():
  # Canary gradients have norm 2C; after clipping each included canary adds
  # exactly C to its coordinate; privatize divides by d / 2.
  inc = audit.choose_included(40, seed=0)
  s = audit.gaussian_step_scores(0.5, 0.0, inc, canaries_per_step=8, seed=0)
  np.testing.assert_allclose(s, np.where(inc, 0.5 * 2 / 8, 0.0), atol=1e-7)


def test_input_canaries_audit_of_memorising_model():
  # A "model" that memorises included canaries: w = sum of included x_i plus
  # Gaussian noise; loss = -<w, x>. High signal -> positive bound.
  m, dim = 2000, 4000
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(m, dim)) / np.sqrt(dim)
  inc = audit.choose_included(m, seed=5)
  w = xs[inc].sum(0) + rng.normal(size=dim) * 0.2 / np.sqrt(dim)
  loss_fn = lambda p, ex: -jnp.vdot(p, ex["x"])
  r = audit.audit_input_canaries(loss_fn, jnp.asarray(w, jnp.float32),
                                 {"x": jnp.asarray(xs, jnp.float32)}, inc,
                                 delta=1e-5, k_pos=50, k_neg=50,
                                 theoretical_epsilon=None)
  assert r.empirical_epsilon > 2.0 and r.counts["num_guesses"] == 100
  d = json.loads(json.dumps(r.to_dict()))
  assert audit.AuditResult.from_dict(d).empirical_epsilon == r.empirical_epsilon


@pytest.fixture(scope="module")
def theory():
  return accounting.epsilon(SIGMA, 1.0, 1, DELTA)


@pytest.mark.parametrize("method,num", [("one_run", 200000),
                                        ("many_run", 400000)])
def test_white_box_audit_of_dp_step(method, num, theory):
  assert theory == pytest.approx(3.80, abs=0.01)
  run = lambda err: audit.audit_gaussian_step(
      1.0, SIGMA, num, method=method, delta=DELTA, seed=0,
      noise_scale_error=err)
  correct = run(1.0)
  assert correct.theoretical_epsilon == pytest.approx(theory)
  # Sound (below the claim) but not trivially loose.
  assert 0.5 * theory < correct.empirical_epsilon <= theory
  # A step with half the claimed noise is caught: bound > claimed epsilon.
  broken = run(0.5)
  assert broken.empirical_epsilon > theory
  assert broken.counts["noise_multiplier_used"] == SIGMA / 2
  # Without noise every guess is right: the largest bound m canaries allow.
  off = run(0.0)
  if method == "one_run":
    c = off.counts
    assert c["num_correct"] == c["num_guesses"]
    best = audit.one_run_epsilon_lower_bound(
        c["num_guesses"], c["num_guesses"], num, DELTA, 1 - 0.05 / 3)
    assert off.empirical_epsilon == pytest.approx(best)
    assert off.empirical_epsilon > 6.0
  else:
    assert off.counts["fpr_count"] == 0 and off.empirical_epsilon > 10.0
