"""Privacy auditing: canaries and empirical epsilon lower bounds.

An audit inserts *canaries* into a DP computation, each included
independently with probability 1/2, scores every canary after the fact, and
turns "included canaries score higher than excluded ones" into a lower bound
on epsilon that holds with probability >= ``confidence`` over the run's
randomness. A bound above the accountant's epsilon means the implementation
(or the analysis) is broken; a bound far below it means the audit is weak, not
that the run is more private than claimed.

Statistics (all exact finite-sample bounds, no asymptotics):

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

Canaries: gradient-space Dirac canaries (``dirac_canaries``) for white-box
audits of the DP step (``audit_gaussian_step``), and input-space helpers
(``choose_included``, ``mislabel``, ``insert_canaries``,
``audit_input_canaries``) for auditing a training run from the final model.
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from dpjax.privacy import accounting
from dpjax.privacy import clipping
from dpjax.privacy import noise

try:  # scipy is optional: exact numpy fallbacks below.
  from scipy import stats as _stats
except ImportError:  # pragma: no cover - exercised via use_scipy=False.
  _stats = None

PyTree = Any
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

  >>> inc = choose_included(2000, seed=0)
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


# ------------------------------------------------------------------ canaries


def choose_included(num_canaries: int, seed: int) -> np.ndarray:
  """bool[num_canaries]: each canary included independently w.p. 1/2.

  >>> choose_included(8, seed=0).astype(int).tolist()
  [0, 1, 1, 1, 0, 0, 0, 0]
  """
  return np.random.default_rng(seed).random(num_canaries) < 0.5


def dirac_canaries(params_like: PyTree, num: int, seed: int, *,
                   l2_norm: float = 1.0, kind: str = "dirac") -> PyTree:
  """Gradient-space canaries: ``num`` directions in parameter space.

  "dirac": canary i is ``l2_norm`` times a one-hot vector on a distinct
  coordinate of the flattened parameters (coordinates drawn without
  replacement from ``seed``), so canaries never interfere. "random": i.i.d.
  uniformly random directions of norm ``l2_norm`` (nearly orthogonal when
  the parameter count >> num).

  >>> c = dirac_canaries({"w": jnp.zeros((2, 2))}, 3, seed=0)
  >>> c["w"].shape, c["w"].reshape(3, 4).sum(1).tolist()
  ((3, 2, 2), [1.0, 1.0, 1.0])

  Args:
    params_like: pytree of arrays shaped like the parameters.
    num: number of canaries (<= parameter count for "dirac").
    seed: seed of the coordinate / direction draw.
    l2_norm: L2 norm of every canary (use >= C so clipping bounds them at C).
    kind: "dirac" or "random".

  Returns:
    Pytree like ``params_like`` with leaves of shape ``[num, *leaf.shape]``
    (dense; memory num * parameter count), float32.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(params_like)
  dim = flat.size
  rng = np.random.default_rng(seed)
  if kind == "dirac":
    if num > dim:
      raise ValueError(f"{num} Dirac canaries need >= {num} parameters, got "
                       f"{dim}.")
    vecs = np.zeros((num, dim), np.float32)
    vecs[np.arange(num), rng.choice(dim, num, replace=False)] = l2_norm
  elif kind == "random":
    vecs = rng.normal(size=(num, dim))
    vecs *= l2_norm / np.linalg.norm(vecs, axis=1, keepdims=True)
  else:
    raise ValueError(f"kind must be 'dirac' or 'random', got {kind!r}.")
  return jax.vmap(unravel)(jnp.asarray(vecs, jnp.float32))


def canary_scores(update: PyTree, canaries: PyTree) -> jax.Array:
  """White-box scores: <update, canary_i> / ||canary_i||, float32 [num].

  >>> canary_scores({"w": jnp.array([1., 2.])},
  ...               {"w": jnp.array([[3., 0.], [0., 2.]])}).tolist()
  [1.0, 2.0]
  """
  dots = sum(jnp.sum((c * u[None]).reshape(c.shape[0], -1), axis=1)
             for u, c in zip(jax.tree_util.tree_leaves(update),
                             jax.tree_util.tree_leaves(canaries)))
  return dots / jax.vmap(clipping.global_norm)(canaries)


def mislabel(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """Input-space canary labels: each label moved to a uniformly random OTHER
  class (so the canary can only be fit by memorising it).

  >>> mislabel(np.array([0, 1, 2, 0]), 3, seed=0).tolist()
  [2, 0, 1, 1]
  """
  labels = np.asarray(labels)
  shift = np.random.default_rng(seed).integers(1, num_classes, labels.shape)
  return ((labels + shift) % num_classes).astype(labels.dtype)


def insert_canaries(dataset: dict, canaries: dict,
                    included: np.ndarray) -> dict:
  """Appends the included canaries to an array dataset (dict of [N, ...]).

  >>> d = insert_canaries({"x": np.zeros(3)}, {"x": np.array([7., 8.])},
  ...                     np.array([False, True]))
  >>> d["x"].tolist()
  [0.0, 0.0, 0.0, 8.0]
  """
  included = np.asarray(included, bool)
  return {k: np.concatenate([np.asarray(v), np.asarray(canaries[k])[included]])
          for k, v in dataset.items()}


def audit_input_canaries(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                         params: PyTree, canaries: PyTree,
                         included: np.ndarray, *, delta: float,
                         k_pos: IntOrSeq, k_neg: IntOrSeq,
                         confidence: float = 0.95,
                         theoretical_epsilon: Optional[float] = None,
                         batch_size: int = 256) -> AuditResult:
  """One-run audit of a finished training run from its input-space canaries.

  Score of canary i = -loss_fn(params, canary_i) under the final ``params``
  (low loss -> guessed member); then ``one_run_audit``. ``included`` must be
  the ``choose_included`` draw that decided which canaries were trained on.
  ``theoretical_epsilon`` is the run's accountant epsilon at ``delta``.

  Args:
    loss_fn: ``loss_fn(params, example) -> scalar`` on ONE example.
    params: final model parameters.
    canaries: batch pytree of all canaries (included or not), leading axis m.
    included: bool[m].
    delta, k_pos, k_neg, confidence: as in ``one_run_audit``.
    theoretical_epsilon: reported beside the bound.
    batch_size: canaries scored per vmap chunk.

  Returns:
    AuditResult (method "one_run").
  """
  per_ex = lambda ex: -loss_fn(params, ex)
  scores = jax.lax.map(per_ex, canaries, batch_size=batch_size)
  return one_run_audit(np.asarray(scores), included, k_pos, k_neg, delta,
                       confidence, theoretical_epsilon=theoretical_epsilon)


# ---------------------------------------------------- white-box DP-step audit


def gaussian_step_scores(l2_clip_norm: float, noise_multiplier: float,
                         included: np.ndarray, *, canaries_per_step: int,
                         seed: int, canary_norm: Optional[float] = None
                         ) -> np.ndarray:
  """White-box scores of Dirac canaries through the real DP step.

  The m = ``included.size`` canaries are split into m / d steps of
  d = ``canaries_per_step``. Each step's batch holds its d canaries, example
  j with loss <params, direction_j> (gradient = direction_j, a Dirac canary
  of norm ``canary_norm``, default 2C, so clipping must cut it to C), mask =
  ``included``; ``clipping.clipped_grad`` sums, ``noise.privatize`` adds the
  noise (key ``fold_in(PRNGKey(seed), step)``) and divides by d / 2; the score
  of a canary is <noisy update, its unit direction>. Every canary is in one
  step only and steps draw independent noise, so w.r.t. each canary the whole
  computation is ONE Gaussian mechanism (parallel composition).

  Returns:
    float64 [m] scores, in the order of ``included``.
  """
  m, d = included.size, canaries_per_step
  if m % d:
    raise ValueError(f"num canaries {m} must be divisible by "
                     f"canaries_per_step {d}.")
  norm = 2.0 * l2_clip_norm if canary_norm is None else canary_norm
  directions = dirac_canaries(jnp.zeros(d), d, seed, l2_norm=norm)
  loss = lambda p, ex: jnp.vdot(p, ex["direction"])
  clipped_sum = clipping.clipped_grad(loss, l2_clip_norm)
  base_key = jax.random.PRNGKey(seed)
  params = jnp.zeros(d, jnp.float32)

  def one_step(args):
    step, mask = args
    total, _ = clipped_sum(params, {"direction": directions}, mask)
    update = noise.privatize(total, jax.random.fold_in(base_key, step),
                             l2_clip_norm, noise_multiplier, d / 2)
    return canary_scores(update, directions)

  masks = jnp.asarray(included.reshape(m // d, d), jnp.float32)
  chunk = int(max(1, min(m // d, 2**22 // (d * d))))
  run = jax.jit(lambda s, k: jax.lax.map(one_step, (s, k), batch_size=chunk))
  scores = run(jnp.arange(m // d), masks)
  return np.asarray(scores, np.float64).ravel()


def audit_gaussian_step(l2_clip_norm: float, noise_multiplier: float,
                        num_canaries: int, *, method: str = "one_run",
                        canaries_per_step: Optional[int] = None,
                        delta: float = 1e-6, confidence: float = 0.95,
                        k_fractions: Sequence[float] = (1 / 300, 1 / 100,
                                                        1 / 30),
                        seed: int = 0,
                        noise_scale_error: float = 1.0) -> AuditResult:
  """White-box audit of the DP step (clip -> sum -> Gaussian noise).

  Runs ``gaussian_step_scores`` with noise multiplier
  ``noise_multiplier * noise_scale_error`` (1.0: the real step; 0.5: a
  deliberately broken step with half the noise; 0: no noise), and compares
  the empirical bound with the epsilon CLAIMED for ``noise_multiplier``:
  ``accounting.epsilon(noise_multiplier, 1.0, 1, delta)`` (one unsampled
  Gaussian mechanism; inf if ``noise_multiplier`` is 0).

  method "one_run": ``one_run_audit`` with k_pos = k_neg = f * m for f in
  ``k_fractions`` (Bonferroni over the fractions); default
  ``canaries_per_step`` 1000. method "many_run": the classic test, one canary
  per step (default ``canaries_per_step`` 1), ``many_run_audit`` with a
  held-out threshold over the m = ``num_canaries`` steps.

  >>> r = audit_gaussian_step(1.0, 1.0, 20000, seed=0)
  >>> round(r.theoretical_epsilon, 2), r.empirical_epsilon < 4.89
  (4.89, True)

  Returns:
    AuditResult; counts also hold the noise multipliers used.
  """
  if method not in ("one_run", "many_run"):
    raise ValueError(f"method must be 'one_run' or 'many_run', got "
                     f"{method!r}.")
  if canaries_per_step is None:
    canaries_per_step = 1000 if method == "one_run" else 1
  included = choose_included(num_canaries, seed)
  scores = gaussian_step_scores(
      l2_clip_norm, noise_multiplier * noise_scale_error, included,
      canaries_per_step=canaries_per_step, seed=seed + 1)
  theory = (math.inf if noise_multiplier == 0 else
            float(accounting.epsilon(noise_multiplier, 1.0, 1, delta)))
  if method == "one_run":
    ks = [max(1, int(round(f * num_canaries))) for f in k_fractions]
    result = one_run_audit(scores, included, ks, ks, delta, confidence,
                           theoretical_epsilon=theory)
  else:
    result = many_run_audit(scores[included], scores[~included], delta,
                            confidence, seed=seed, theoretical_epsilon=theory)
  counts = dict(result.counts, noise_multiplier=noise_multiplier,
                noise_multiplier_used=noise_multiplier * noise_scale_error,
                canaries_per_step=canaries_per_step)
  return dataclasses.replace(result, counts=counts)
