r"""Privacy of a hyper-parameter search: release the best of K runs, K random.

Papernot & Steinke, "Hyperparameter Tuning with Renyi Differential
Privacy" (ICLR 2022, arXiv:2110.03620). A search draws K from a
data-independent distribution, runs the randomized algorithm Q (draw
hyper-parameters from the space, train with DP) K times independently, and
releases only the best run's output (its params, hyper-parameters and
score) under a total order on outputs. K, the other runs and their scores
are NOT released: publishing them is K releases (composition), not this.

Theorem 2 (truncated negative binomial, "TNB"). If Q is (lambda, eps)-RDP
and (lambda_hat, eps_hat)-RDP (lambda > 1, lambda_hat >= 1) and K ~
D_{eta,gamma} with eta in (-1, inf), gamma in (0, 1),

  P[K = k] = (1 - gamma)^k / (gamma^-eta - 1) * prod_{l<k} (l + eta)/(l + 1)
             (k >= 1; eta = 0: (1 - gamma)^k / (k log(1/gamma)), logarithmic;
             eta = 1: gamma (1 - gamma)^(k-1), geometric),
  E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta))   (eta = 0:
         (1/gamma - 1) / log(1/gamma); eta = 1: 1/gamma),

then the best of K runs is (lambda, eps')-RDP with

  eps' = eps + (1 + eta) (1 - 1/lambda_hat) eps_hat
             + (1 + eta) log(1/gamma) / lambda_hat + log(E[K]) / (lambda - 1).

`tnb_rdp` takes the best lambda_hat of the grid for every lambda and then
uses that RDP is non-decreasing in the order (a bound at a higher order
holds at a lower one).

Theorem 6 (Poisson). If Q is (lambda, eps)-RDP and (eps_hat, delta_hat)-DP
with e^eps_hat <= 1 + 1/(lambda - 1), and K ~ Poisson(mu) (K = 0 releases
a fixed output), the best of K runs is (lambda, eps')-RDP with

  eps' = eps + mu delta_hat + log(mu) / (lambda - 1).

`poisson_rdp` uses eps_hat = log(1 + 1/(lambda - 1)) (the largest allowed)
and delta_hat(eps_hat) from Q's RDP curve (dp_accounting's conversion). We
require mu >= 1, as dp_accounting's implementation of the same theorem
does (for mu < 1 the stated eps' can be negative).

Heterogeneous runs: each run of Q draws its hyper-parameters, so Q is a
mixture over the space; Renyi divergence is jointly quasi-convex, so Q is
(lambda, sup_h eps_h(lambda))-RDP where the sup runs over the SUPPORT of the
space (not only the drawn runs). Callers pass that pointwise maximum
(`worst_rdp`). RDP -> (epsilon, delta): dp_accounting's conversion
(`rdp_to_epsilon`).
"""

import dataclasses
import logging as py_logging
import math
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
import numpy as np

from dpjax.privacy import accounting

# dp_accounting's RDP of the subsampled Gaussian at fractional orders near 1
# often fails to converge (that order is then inf: excluded, still a valid
# bound); this grid keeps few of them.
ORDERS = ((1.25, 1.5, 1.75) + tuple(np.arange(2.0, 10.5, 0.5).tolist()) +
          tuple(float(a) for a in range(11, 65)) +
          (80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0))


@dataclasses.dataclass(frozen=True)
class Poisson:
  """K ~ Poisson(mean), mean >= 1 (K = 0: nothing trained, a fixed output)."""
  mean: float

  def __post_init__(self):
    if not self.mean >= 1:
      raise ValueError(f"Poisson mean must be >= 1, got {self.mean}.")

  def sample(self, rng: np.random.Generator) -> int:
    return int(rng.poisson(self.mean))

  def describe(self) -> dict[str, Any]:
    return dict(distribution="poisson", mean=self.mean)


@dataclasses.dataclass(frozen=True)
class TruncatedNegativeBinomial:
  """K ~ D_{eta,gamma} (module docstring): K >= 1, eta > -1, 0 < gamma < 1."""
  eta: float
  gamma: float

  def __post_init__(self):
    if not (self.eta > -1 and 0 < self.gamma < 1):
      raise ValueError(f"need eta > -1 and 0 < gamma < 1, got eta="
                       f"{self.eta}, gamma={self.gamma}.")

  @property
  def mean(self) -> float:
    """E[K] (closed form)."""
    e, g = self.eta, self.gamma
    if e == 0:
      return (1 / g - 1) / math.log(1 / g)
    return e * (1 - g) / (g * (1 - g ** e))

  def pmf(self, k: int) -> float:
    """P[K = k] by the recurrence p(k+1) = p(k) (1-gamma) (k+eta) / (k+1)."""
    if k < 1:
      return 0.0
    e, g = self.eta, self.gamma
    p = ((1 - g) / math.log(1 / g) if e == 0 else
         (1 - g) * e / (g ** -e - 1))
    for j in range(1, k):
      p *= (1 - g) * (j + e) / (j + 1)
    return p

  def sample(self, rng: np.random.Generator) -> int:
    """Inversion: the first k with P[K <= k] >= u."""
    u, k, cdf = rng.random(), 1, 0.0
    e, g = self.eta, self.gamma
    p = self.pmf(1)
    while True:
      cdf += p
      if cdf >= u or p < 1e-300:
        return k
      p *= (1 - g) * (k + e) / (k + 1)
      k += 1

  @classmethod
  def from_mean(cls, eta: float, mean: float) -> "TruncatedNegativeBinomial":
    """The D_{eta,gamma} with E[K] = mean (> 1): gamma by bisection (E[K]
    decreases in gamma), rounded up so that E[K] <= mean."""
    if not mean > 1:
      raise ValueError(f"mean must be > 1, got {mean}.")
    lo, hi = 1e-12, 1 - 1e-12
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      if cls(eta, mid).mean > mean:
        lo = mid
      else:
        hi = mid
    return cls(eta, hi)

  def describe(self) -> dict[str, Any]:
    return dict(distribution="truncated_negative_binomial", eta=self.eta,
                gamma=self.gamma, mean=self.mean)


Distribution = Poisson | TruncatedNegativeBinomial


def distribution(name: str, *, mean: float = 0.0, eta: float = 1.0,
                 gamma: float = 0.0) -> Distribution:
  """"poisson" (mean) or "truncated_negative_binomial" ("tnb"; eta and
  gamma, or eta and mean)."""
  if name == "poisson":
    return Poisson(float(mean))
  if name in ("truncated_negative_binomial", "tnb"):
    if gamma:
      return TruncatedNegativeBinomial(float(eta), float(gamma))
    return TruncatedNegativeBinomial.from_mean(float(eta), float(mean))
  raise ValueError(f"unknown distribution {name!r}: use 'poisson' or "
                   "'truncated_negative_binomial'.")


def _sorted(orders: Sequence[float], rdp: Sequence[float]):
  orders, rdp = np.asarray(orders, np.float64), np.asarray(rdp, np.float64)
  if orders.shape != rdp.shape or np.any(np.diff(orders) <= 0):
    raise ValueError("orders must be increasing and match rdp in length.")
  if np.any(orders < 1):
    raise ValueError("Renyi orders must be >= 1.")
  return orders, rdp


def tnb_rdp(orders: Sequence[float], rdp: Sequence[float],
            dist: TruncatedNegativeBinomial) -> np.ndarray:
  """Theorem 2: RDP of the best of K ~ D_{eta,gamma} runs of a Q whose RDP
  at `orders` is `rdp` (inf where lambda = 1 and no higher order helps)."""
  orders, rdp = _sorted(orders, rdp)
  with np.errstate(invalid="ignore"):
    hat = ((1 - 1 / orders) * rdp + math.log(1 / dist.gamma) / orders)
  c = (1 + dist.eta) * np.nanmin(np.where(np.isfinite(rdp), hat, np.inf))
  out = np.full_like(rdp, np.inf)
  above = orders > 1
  out[above] = (rdp[above] + c +
                math.log(dist.mean) / (orders[above] - 1))
  return np.minimum.accumulate(out[::-1])[::-1]  # Monotone in the order.


def poisson_rdp(orders: Sequence[float], rdp: Sequence[float],
                dist: Poisson) -> np.ndarray:
  """Theorem 6: RDP of the best of K ~ Poisson(mu) runs (module doc)."""
  orders, rdp = _sorted(orders, rdp)
  out = np.full_like(rdp, np.inf)
  for i, lam in enumerate(orders):
    if lam <= 1 or not np.isfinite(rdp[i]):
      continue
    eps_hat = math.log1p(1 / (lam - 1))
    delta_hat, _ = rdp_lib.compute_delta(orders, rdp, eps_hat)
    out[i] = rdp[i] + dist.mean * delta_hat + math.log(dist.mean) / (lam - 1)
  return out


def search_rdp(orders: Sequence[float], rdp: Sequence[float],
               dist: Distribution) -> np.ndarray:
  """RDP of the released best run, for either distribution of K."""
  if isinstance(dist, Poisson):
    return poisson_rdp(orders, rdp, dist)
  return tnb_rdp(orders, rdp, dist)


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float],
                   delta: float) -> tuple[float, float]:
  """(epsilon, best order) at `delta`: dp_accounting's RDP conversion."""
  eps, order = rdp_lib.compute_epsilon(list(orders), list(rdp), delta)
  return float(eps), float(order)


def search_epsilon(orders: Sequence[float], trial_rdp: Sequence[float],
                   dist: Distribution, delta: float) -> dict[str, Any]:
  """(epsilon, delta) of releasing the best of K runs.

  Formal guarantee: if every run of Q (hyper-parameter draw and training)
  is (lambda, trial_rdp[lambda])-RDP at every order, the released best run
  (and nothing else: not K, not the other runs) is (epsilon, delta)-DP.

  Returns:
    dict(epsilon, delta, order (the Renyi order of the conversion),
    trial_epsilon (one run's RDP-converted epsilon at delta), how).
  """
  out_rdp = search_rdp(orders, trial_rdp, dist)
  eps, order = rdp_to_epsilon(orders, out_rdp, delta)
  trial_eps, _ = rdp_to_epsilon(orders, trial_rdp, delta)
  theorem = ("Theorem 6 (Poisson)" if isinstance(dist, Poisson) else
             "Theorem 2 (truncated negative binomial)")
  return dict(epsilon=eps, delta=float(delta), order=order,
              trial_rdp_epsilon=trial_eps,
              how=(f"Papernot & Steinke (ICLR 2022) {theorem} on the "
                   "pointwise max of the runs' RDP curves (dp_accounting "
                   "RdpAccountant), then dp_accounting's RDP -> "
                   "(epsilon, delta) conversion"))


def rdp_curve(event: dp_accounting.DpEvent,
              orders: Sequence[float] = ORDERS) -> np.ndarray:
  """RDP of `event` at `orders` (add/remove-one; dp_accounting)."""
  acc = dp_accounting.rdp.RdpAccountant(list(orders))
  # "failed to converge" (that order becomes inf) is logged through absl:
  # silence it, then restore absl's logger level exactly (set_verbosity
  # would leave a level set where there was none).
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(py_logging.ERROR)
  try:
    acc.compose(event)
  finally:
    absl_logger.setLevel(level)
  return np.asarray(acc._rdp, np.float64)  # pylint: disable=protected-access


def supports_rdp(event: dp_accounting.DpEvent) -> bool:
  """Whether dp_accounting's RdpAccountant has an RDP bound for `event`
  (not for truncated Poisson sampling: PLD only)."""
  return dp_accounting.rdp.RdpAccountant(list(ORDERS)).supports(event)


def dpsgd_rdp(noise_multiplier: float, sampling_rate: float, steps: int,
              orders: Sequence[float] = ORDERS) -> np.ndarray:
  """RDP curve of `steps` Poisson-subsampled Gaussian steps."""
  if not steps or not sampling_rate:
    return np.zeros(len(orders))
  if not noise_multiplier:
    return np.full(len(orders), np.inf)
  return rdp_curve(accounting.dp_event(noise_multiplier, sampling_rate,
                                       steps), orders)


def _pieces(value: Any, steps: int) -> list[tuple[float, int]]:
  """A results.json varying fact -> [(value, steps)] (as_run.py)."""
  if isinstance(value, list):
    return [(float(v), int(n)) for v, n in value]
  return [(float(value), int(steps))]


def _aligned(a: list[tuple[float, int]], b: list[tuple[float, int]]):
  """Pairs two segmentations of the same steps: [(a_value, b_value, n)]."""
  out, i, j = [], 0, 0
  left_a, left_b = (a[0][1] if a else 0), (b[0][1] if b else 0)
  while i < len(a) and j < len(b):
    n = min(left_a, left_b)
    if n:
      out.append((a[i][0], b[j][0], n))
    left_a, left_b = left_a - n, left_b - n
    if not left_a:
      i += 1
      left_a = a[i][1] if i < len(a) else 0
    if not left_b:
      j += 1
      left_b = b[j][1] if j < len(b) else 0
  return out


def results_events(results: Mapping[str, Any]) -> list[dp_accounting.DpEvent]:
  """The dp_accounting events of a run's private phases, from its
  results.json: DP-SGD segments (sigma, q, steps as run); BandMF at rate q b
  over ceil(steps / b) steps; BLT as one Gaussian mechanism of its sigma
  (its whole phase's cost, an upper bound for a phase cut short)."""
  if not results.get("private"):
    return []
  mechanism, bands = results.get("mechanism", "dpsgd"), int(
      results.get("bands", 1))
  if mechanism not in ("dpsgd", "bandmf", "blt"):
    raise ValueError(f"results.json of mechanism {mechanism!r}: no RDP "
                     "curve is read for it (truncated Poisson: PLD only).")
  events = []
  for key, private in results.items():
    if not key.endswith("/private") or private is not True:
      continue
    name = key[:-len("/private")]
    steps = int(results[f"{name}/steps"])
    if not steps:
      continue
    sigma, rate = results[f"{name}/noise_multiplier"], results[
        f"{name}/sampling_rate"]
    if mechanism == "blt":
      events.append(dp_accounting.GaussianDpEvent(float(sigma)))
      continue
    for s, q, n in _aligned(_pieces(sigma, steps), _pieces(rate, steps)):
      if mechanism == "bandmf":
        events.append(accounting.dp_event(s, q * bands, -(-n // bands)))
      else:
        events.append(accounting.dp_event(s, q, n))
  return events


def results_rdp(results: Mapping[str, Any],
                orders: Sequence[float] = ORDERS) -> np.ndarray:
  """RDP curve of a finished run from its results.json (zeros: public)."""
  events = results_events(results)
  if not events:
    return np.zeros(len(orders))
  if any(getattr(e, "noise_multiplier", 1.0) == 0 for e in events):
    return np.full(len(orders), np.inf)
  return rdp_curve(dp_accounting.ComposedDpEvent(events), orders)


def worst_rdp(curves: Sequence[np.ndarray]) -> np.ndarray:
  """Pointwise max of RDP curves: the RDP of any mixture of them."""
  return np.max(np.stack([np.asarray(c, np.float64) for c in curves]), axis=0)


def calibrate_trial_epsilon(target_epsilon: float, delta: float,
                            dist: Distribution,
                            trial_rdp_for: Callable[[float], np.ndarray],
                            orders: Sequence[float] = ORDERS,
                            rtol: float = 1e-3) -> float:
  """Largest per-run epsilon e whose search epsilon is <= target, to rtol.

  `trial_rdp_for(e)` is the RDP curve of one run calibrated to epsilon e
  (the worst over the space; each call calibrates sigma: seconds). The
  search epsilon grows with e, nearly linearly: regula falsi (Illinois) on
  a bracket [lo, hi] with search epsilon(lo) <= target < (hi), until
  (1 - rtol) target <= search epsilon(lo) or hi - lo <= rtol lo (a few
  calls). Returns lo: its search epsilon is <= target by construction.
  """
  if target_epsilon <= 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
  g = lambda e: search_epsilon(orders, trial_rdp_for(e), dist,
                               delta)["epsilon"] - target_epsilon
  hi = target_epsilon
  g_hi = g(hi)
  if g_hi <= 0:
    return hi
  lo = hi / 2
  g_lo = g(lo)
  while g_lo > 0:
    hi, g_hi, lo = lo, g_lo, lo / 2
    if lo < 1e-3:
      raise ValueError(f"search target_epsilon {target_epsilon} is "
                       f"unreachable with K ~ {dist.describe()}.")
    g_lo = g(lo)
  # Regula falsi through (lo, w_lo), (hi, w_hi): the true values, except
  # that an end kept twice in a row has its value halved (Illinois).
  w_lo, w_hi, kept = g_lo, g_hi, 0
  while hi - lo > rtol * lo and g_lo < -rtol * target_epsilon:
    width = hi - lo
    mid = lo - w_lo * width / (w_hi - w_lo)
    mid = min(max(mid, lo + 0.01 * width), hi - 0.01 * width)
    g_mid = g(mid)
    if g_mid <= 0:
      lo, g_lo, w_lo = mid, g_mid, g_mid
      w_hi = w_hi / 2 if kept == -1 else w_hi
      kept = -1
    else:
      hi, g_hi, w_hi = mid, g_mid, g_mid
      w_lo = w_lo / 2 if kept == 1 else w_lo
      kept = 1
  return lo
