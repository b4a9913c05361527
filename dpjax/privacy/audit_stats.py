"""Statistics of privacy audits: exact empirical-epsilon lower bounds.

* ``one_run_epsilon_lower_bound`` / ``one_run_audit``: Steinke, Nasr and
  Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
  arXiv:2305.08846). m canaries, r guesses, v correct. Under (eps, delta)-DP
  P[V >= v] <= beta + 2 m delta alpha, with W ~ Binomial(r, e^eps/(1+e^eps)),
  beta = P[W >= v], alpha = max_{1<=i<=v} P[v - i <= W < v] / i (their
  (eps, delta) theorem, as in the p-value routine published with the paper).
  The bound is the largest eps whose p-value is < 1 - confidence.
* ``epsilon_lower_bound_threshold`` / ``many_run_audit``: the classic test
  over many runs: at a threshold t, (eps, delta)-DP implies
  TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta; Clopper-Pearson
  bounds (TPR_lo, FPR_hi) hold jointly with probability >= confidence.
  Picking the best t on the same scores would be optimistic, so
  ``many_run_audit`` picks t on a held-out half (or Bonferroni-corrects over a
  caller-fixed threshold grid).

Numpy only (scipy when importable); canaries and the white-box audit of the
DP step live in ``audit.py``.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import numpy as np

try:  # scipy is optional: exact numpy fallbacks below.
  from scipy import stats as _stats
except ImportError:  # pragma: no cover - exercised via use_scipy=False.
  _stats = None

IntOrSeq = Union[int, Sequence[int]]

# ------------------------------------------------------------------ binomial


def _binom_logpmf(n: int, p: float) -> np.ndarray:
  """log P[Binomial(n, p) = k] for k = 0..n, float64 [n + 1] (numpy only)."""
  k = np.arange(n + 1)
  lg = np.vectorize(math.lgamma, otypes=[np.float64])(k + 1.0)
  logc = math.lgamma(n + 1.0) - lg - lg[::-1]
  with np.errstate(divide="ignore", invalid="ignore"):
    lp = np.where(k > 0, k * np.log(p) if p > 0 else -np.inf, 0.0)
    lq = np.where(k < n, (n - k) * np.log1p(-p) if p < 1 else -np.inf, 0.0)
  return logc + lp + lq


def _binom_pmf(k: np.ndarray, n: int, p: float, use_scipy: bool):
  if use_scipy and _stats is not None:
    return _stats.binom.pmf(k, n, p)
  return np.exp(_binom_logpmf(n, p))[k]


def _binom_sf_ge(k: int, n: int, p: float, use_scipy: bool) -> float:
  """P[Binomial(n, p) >= k]."""
  if k <= 0:
    return 1.0
  if k > n:
    return 0.0
  if use_scipy and _stats is not None:
    return float(_stats.binom.sf(k - 1, n, p))
  return float(min(1.0, np.exp(_binom_logpmf(n, p))[k:].sum()))


def _bisect(f: Callable[[float], bool], lo: float, hi: float,
            iters: int = 100) -> float:
  """Largest x in [lo, hi] (to ~1e-15) with f(x) True; f monotone T..T F..F."""
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    if f(mid):
      lo = mid
    else:
      hi = mid
  return lo


def clopper_pearson(k: int, n: int, alpha: float, *,
                    use_scipy: bool = True) -> tuple[float, float]:
  """Two-sided Clopper-Pearson interval for a binomial proportion.

  Formal guarantee: for K ~ Binomial(n, p), P[p < lo] <= alpha / 2 and
  P[p > hi] <= alpha / 2 (exact, conservative).

  >>> [round(x, 4) for x in clopper_pearson(5, 10, 0.05)]
  [0.1871, 0.8129]
  >>> clopper_pearson(0, 10, 0.05)[0], round(clopper_pearson(0, 10, 0.05)[1], 4)
  (0.0, 0.3085)

  Args:
    k: successes, 0 <= k <= n.
    n: trials, n >= 1.
    alpha: 1 - coverage of the two-sided interval.
    use_scipy: use scipy.stats.beta when importable (else numpy bisection).

  Returns:
    (lo, hi) with lo = Beta.ppf(alpha/2; k, n-k+1) (0 if k = 0) and
    hi = Beta.ppf(1-alpha/2; k+1, n-k) (1 if k = n).
  """
  if not 0 <= k <= n or n < 1:
    raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}.")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
  a = alpha / 2
  if use_scipy and _stats is not None:
    lo = float(_stats.beta.ppf(a, k, n - k + 1)) if k > 0 else 0.0
    hi = float(_stats.beta.ppf(1 - a, k + 1, n - k)) if k < n else 1.0
    return lo, hi
  # P[Bin(n, p) >= k] increases in p: lo solves it = a; hi solves
  # P[Bin(n, p) <= k] = a, i.e. P[Bin(n, p) >= k + 1] = 1 - a.
  lo = 0.0 if k == 0 else _bisect(
      lambda p: _binom_sf_ge(k, n, p, False) < a, 0.0, 1.0, 60)
  hi = 1.0 if k == n else _bisect(
      lambda p: _binom_sf_ge(k + 1, n, p, False) < 1 - a, 0.0, 1.0, 60)
  return lo, hi


# ------------------------------------------------------------- many-run test


def epsilon_lower_bound_threshold(tpr_count: int, n_in: int, fpr_count: int,
                                  n_out: int, delta: float,
                                  confidence: float = 0.95, *,
                                  use_scipy: bool = True) -> float:
  """Epsilon lower bound from one fixed threshold test (many runs).

  ``tpr_count`` of ``n_in`` runs WITH the canary and ``fpr_count`` of
  ``n_out`` runs WITHOUT it scored above a threshold fixed before seeing the
  scores. With TPR_lo, FPR_hi the Clopper-Pearson bounds (each one-sided at
  (1 - confidence) / 2, jointly valid with probability >= confidence), returns
  max(0, log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) /
  (1 - TPR_lo))): the second term is the same test on the complement event.
  Formal guarantee: if the mechanism is (eps, delta)-DP for add/remove of the
  canary, P[returned value > eps] <= 1 - confidence.

  >>> round(epsilon_lower_bound_threshold(900, 1000, 10, 1000, 1e-5), 3)
  3.872
  >>> epsilon_lower_bound_threshold(500, 1000, 500, 1000, 1e-5)
  0.0

  Returns:
    The lower bound on epsilon (float >= 0).
  """
  alpha = 1.0 - confidence
  tpr_lo, _ = clopper_pearson(tpr_count, n_in, alpha, use_scipy=use_scipy)
  _, fpr_hi = clopper_pearson(fpr_count, n_out, alpha, use_scipy=use_scipy)
  best = 0.0
  if tpr_lo > delta:
    best = max(best, math.log((tpr_lo - delta) / fpr_hi))
  if 1 - fpr_hi > delta and tpr_lo < 1:
    best = max(best, math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
  return best


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """An empirical epsilon lower bound and what it was computed from.

  Attributes:
    empirical_epsilon: eps_lb; P[eps_lb > true eps] <= 1 - confidence.
    confidence: the confidence level of the bound (e.g. 0.95).
    theoretical_epsilon: the accountant's epsilon at the same delta (None if
      not known, inf for a run without noise).
    method: "one_run" (Steinke et al. 2023) or "many_run" (threshold test).
    delta: the delta both epsilons are stated at.
    counts: the aggregate counts behind the bound (no per-canary values).
  """
  empirical_epsilon: float
  confidence: float
  theoretical_epsilon: Optional[float]
  method: str
  delta: float
  counts: dict = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    """JSON-ready dict (plain Python numbers), e.g. for ``workdir/audit.json``.

    >>> d = AuditResult(1.5, 0.95, 4.0, "one_run", 1e-6, {"k": 3}).to_dict()
    >>> d["empirical_epsilon"], d["counts"]
    (1.5, {'k': 3})
    """
    def plain(x):
      if isinstance(x, (np.generic,)):
        return x.item()
      return x
    out = dataclasses.asdict(self)
    out["counts"] = {k: plain(v) for k, v in self.counts.items()}
    for k in ("empirical_epsilon", "confidence", "theoretical_epsilon",
              "delta"):
      out[k] = None if out[k] is None else float(out[k])
    return out

  @classmethod
  def from_dict(cls, d: dict) -> "AuditResult":
    return cls(**d)


def many_run_audit(scores_in: np.ndarray, scores_out: np.ndarray,
                   delta: float, confidence: float = 0.95, *,
                   thresholds: Optional[Sequence[float]] = None,
                   seed: int = 0, num_candidates: int = 200,
                   min_tail_count: int = 100,
                   theoretical_epsilon: Optional[float] = None,
                   use_scipy: bool = True) -> AuditResult:
  """Threshold-test audit over many runs (or many independent canaries).

  ``scores_in[j]``: a canary's score in run j where it was included;
  ``scores_out[j]``: where it was not. Test "member iff score >= t" (and its
  complement). Threshold choice, so that the returned bound keeps its
  guarantee:

  * ``thresholds=None`` (default): split both score sets in half at random
    (``seed``); among ``num_candidates`` quantiles of the first half's pooled
    scores (geometrically dense in both tails, but no tail thinner than
    ``min_tail_count`` scores) pick the t maximising the bound on the first
    half; report ``epsilon_lower_bound_threshold`` at that t on the second
    half only (so t is independent of the scores that certify the bound).
  * ``thresholds`` given (fixed WITHOUT looking at these scores): evaluate each
    on all scores at confidence 1 - (1 - confidence) / len(thresholds) and
    return the max (Bonferroni).

  Formal guarantee: if the audited mechanism is (eps, delta)-DP w.r.t. the
  canary, P[empirical_epsilon > eps] <= 1 - confidence.

  >>> rng = np.random.default_rng(0)
  >>> r = many_run_audit(rng.normal(4, 1, 20000), rng.normal(0, 1, 20000),
  ...                    1e-5)
  >>> 1.0 < r.empirical_epsilon < 8.0   # Gaussian mechanism, eps(1e-5) ~ 7.9
  True

  Returns:
    AuditResult with method "many_run"; counts hold the threshold and the
    counts above it.
  """
  scores_in = np.asarray(scores_in, np.float64).ravel()
  scores_out = np.asarray(scores_out, np.float64).ravel()
  def counts_at(t, s_in, s_out):
    return int(np.sum(s_in >= t)), int(np.sum(s_out >= t))

  if thresholds is not None:
    conf = 1.0 - (1.0 - confidence) / len(thresholds)
    best = (-1.0, None, 0, 0)
    for t in thresholds:
      tp, fp = counts_at(t, scores_in, scores_out)
      e = epsilon_lower_bound_threshold(tp, scores_in.size, fp,
                                        scores_out.size, delta, conf,
                                        use_scipy=use_scipy)
      if e > best[0]:
        best = (e, float(t), tp, fp)
    eps, t, tp, fp = best
    n_in, n_out, selection = scores_in.size, scores_out.size, "bonferroni"
  else:
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.permutation(scores_in), rng.permutation(scores_out)
    h_in, h_out = s_in.size // 2, s_out.size // 2
    sel_in, sel_out = s_in[:h_in], s_out[:h_out]
    pooled = np.concatenate([sel_in, sel_out])
    # Candidate tails no thinner than ~min_tail_count selection scores: the
    # best threshold on very few scores is mostly selection noise.
    tail = np.geomspace(min(0.5, min_tail_count / pooled.size), 0.5,
                        num_candidates // 2)
    cands = np.unique(np.quantile(pooled, np.concatenate([tail, 1 - tail])))
    best = (-1.0, cands[0])
    for t in cands:
      tp, fp = counts_at(t, sel_in, sel_out)
      e = epsilon_lower_bound_threshold(tp, h_in, fp, h_out, delta,
                                        confidence, use_scipy=use_scipy)
      if e > best[0]:
        best = (e, float(t))
    t = best[1]
    ev_in, ev_out = s_in[h_in:], s_out[h_out:]
    tp, fp = counts_at(t, ev_in, ev_out)
    n_in, n_out, selection = ev_in.size, ev_out.size, "holdout"
    eps = epsilon_lower_bound_threshold(tp, n_in, fp, n_out, delta,
                                        confidence, use_scipy=use_scipy)
  return AuditResult(
      float(eps), confidence, theoretical_epsilon, "many_run", delta,
      {"threshold": t, "tpr_count": tp, "n_in": n_in, "fpr_count": fp,
       "n_out": n_out, "threshold_selection": selection})


# -------------------------------------------------------------- one-run test


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int,
                    eps: float, delta: float, *,
                    use_scipy: bool = True) -> float:
  """P[>= num_correct correct guesses] under (eps, delta)-DP (upper bound).

  Steinke-Nasr-Jagielski (eps, delta) bound with m = num_canaries,
  r = num_guesses, v = num_correct, W ~ Binomial(r, q), q = e^eps/(1+e^eps):
  ``min(1, P[W >= v] + 2 m delta max_{1<=i<=v} P[v-i <= W < v] / i)``.
  """
  m, r, v = num_canaries, num_guesses, num_correct
  if not 0 <= v <= r <= m:
    raise ValueError(f"need 0 <= num_correct <= num_guesses <= num_canaries, "
                     f"got {v}, {r}, {m}.")
  q = 1.0 / (1.0 + math.exp(-eps))
  beta = _binom_sf_ge(v, r, q, use_scipy)
  if delta == 0 or v == 0:
    return min(1.0, beta)
  pm = _binom_pmf(np.arange(v - 1, -1, -1), r, q, use_scipy)
  alpha = float(np.max(np.cumsum(pm) / np.arange(1, v + 1)))
  return min(1.0, beta + 2.0 * m * delta * alpha)


def one_run_epsilon_lower_bound(num_guesses: int, num_correct: int,
                                num_canaries: int, delta: float,
                                confidence: float = 0.95, *,
                                use_scipy: bool = True) -> float:
  """One-run epsilon lower bound (Steinke, Nasr, Jagielski 2023).

  Each of ``num_canaries`` canaries was included independently with
  probability 1/2; an auditor that sees only the output guessed
  included/excluded for ``num_guesses`` of them (abstaining on the rest),
  ``num_correct`` correctly. Returns the largest eps (bisection, 1e-10) with
  ``one_run_p_value(eps) < 1 - confidence``, or 0 if there is none.
  Formal guarantee: if the run is (eps, delta)-DP w.r.t. each canary,
  P[returned value > eps] <= 1 - confidence.

  >>> round(one_run_epsilon_lower_bound(100, 100, 1000, 0.0), 3)
  3.493
  >>> one_run_epsilon_lower_bound(1000, 520, 10000, 1e-6)   # chance level
  0.0

  Returns:
    The lower bound on epsilon (float >= 0).
  """
  p = 1.0 - confidence
  pv = lambda e: one_run_p_value(num_canaries, num_guesses, num_correct, e,
                                 delta, use_scipy=use_scipy)
  if pv(0.0) >= p:
    return 0.0
  hi = 1.0
  while pv(hi) < p and hi < 64:
    hi *= 2
  return _bisect(lambda e: pv(e) < p, 0.0, hi, 50)


def one_run_audit(scores: np.ndarray, included: np.ndarray, k_pos: IntOrSeq,
                  k_neg: IntOrSeq, delta: float, confidence: float = 0.95, *,
                  theoretical_epsilon: Optional[float] = None,
                  use_scipy: bool = True) -> AuditResult:
  """One-run audit: guess the top-``k_pos`` scores in, bottom-``k_neg`` out.

  ``scores[i]`` must depend on the run's output only (higher = more likely
  included); ``included[i]`` is the canary's true (random, p = 1/2) status.
  ``k_pos``/``k_neg`` may be equal-length sequences of candidate guess
  counts, fixed before the run: each pair is evaluated at confidence
  1 - (1 - confidence) / len(pairs) and the max is returned (Bonferroni), so
  the guarantee of ``one_run_epsilon_lower_bound`` is kept.

  >>> inc = np.random.default_rng(0).random(2000) < 0.5  # choose_included
  >>> r = one_run_audit(inc.astype(float), inc, 200, 200, 1e-6)
  >>> r.counts["num_correct"], round(r.empirical_epsilon, 2)
  (400, 4.89)

  Returns:
    AuditResult with method "one_run".
  """
  scores = np.asarray(scores, np.float64).ravel()
  included = np.asarray(included, bool).ravel()
  if scores.shape != included.shape:
    raise ValueError(f"scores {scores.shape} and included {included.shape} "
                     "must have the same shape.")
  ks_pos = np.atleast_1d(k_pos).astype(int)
  ks_neg = np.atleast_1d(k_neg).astype(int)
  if ks_pos.shape != ks_neg.shape:
    raise ValueError("k_pos and k_neg must have the same length.")
  m = scores.size
  order = np.argsort(-scores, kind="stable")  # Ties: by index, not status.
  conf = 1.0 - (1.0 - confidence) / ks_pos.size
  best = None
  for kp, kn in zip(ks_pos, ks_neg):
    if kp + kn > m:
      raise ValueError(f"k_pos + k_neg = {kp + kn} > {m} canaries.")
    correct = int(included[order[:kp]].sum())
    correct += int((~included[order[m - kn:]]).sum()) if kn else 0
    e = one_run_epsilon_lower_bound(int(kp + kn), correct, m, delta, conf,
                                    use_scipy=use_scipy)
    if best is None or e > best[0]:
      best = (e, int(kp), int(kn), correct)
  eps, kp, kn, correct = best
  return AuditResult(
      float(eps), confidence, theoretical_epsilon, "one_run", delta,
      {"num_canaries": m, "num_guesses": kp + kn, "num_correct": correct,
       "k_pos": kp, "k_neg": kn, "num_k_candidates": int(ks_pos.size)})
