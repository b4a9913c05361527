"""Buffered-linear-Toeplitz (BLT) noise: Gaussian noise correlated across all
steps through d buffers, and its accounting (no amplification).

BLT matrix factorization (McMahan et al. 2024, "Efficient and near-optimal
noise generation for streaming differential privacy"): step t adds
w_t = (C^{-1} z)_t to the clipped sum, for the lower-triangular Toeplitz
strategy C with c_0 = 1 and c_k = sum_i omega_i theta_i^(k-1) (k >= 1;
theta in (0, 1)^d, omega > 0). C^{-1} z streams with d buffers s_i (each
like the params, in the optimizer state): w_t = z_t - sum_i omega_i s_i,
then s_i <- theta_i s_i + w_t. The noisy sums x_t + w_t are a
post-processing of C x + z, a Gaussian mechanism; a lower-triangular C
keeps this valid for adaptively chosen x (Denisov et al., NeurIPS 2022).

Sensitivity: participations are >= b = `min_separation` steps apart
(b-cyclic Poisson sampling, `sampling.sample_cyclic_indices`: each example
in its own secret, uniform partition fixed for the phase, partition t mod b
sampled at rate q b; the bound below holds for every fixed partition, so
for the random one by joint convexity, as that docstring says). C >= 0 and
c_k decreasing (k >= 1) make (C^T C)_ij >= 0, decreasing in ``|i - j|`` and in
max(i, j), so the worst set of participations
in steps [0, t) is S_0 = {0, b, 2b, ...}: Delta_t = ||(C 1_{S_0})[:t]||_2
(`prefix_sensitivity`; tested against a brute-force maximum). Proven for
theta in (0, 1)^d, omega > 0 only: other strategies (negative omega, theta
outside (0, 1)), where this closed form can fall far below the true
maximum, are refused (`check_strategy`).

Formal guarantee (add/remove-one, example level): with every clipped sum of
sensitivity C_clip, b-cyclic Poisson sampling and noise std
sigma C_clip Delta_n per coordinate of w (n = the phase's steps), the phase
is a mixture over participation sets of Gaussian mechanisms of sensitivity
<= Delta_n at noise Delta_n sigma, so (joint convexity of the hockey-stick
divergence) it is as private as ONE Gaussian mechanism with noise multiplier
sigma (`epsilon`); its first t steps as one with multiplier
sigma Delta_n / Delta_t (`ledger_rho`). Sampling gives no amplification
here: the bound does not depend on q, n or b.

Strategy: (theta, omega) minimise the prefix-sum error
Delta_n^2 ||A C^{-1}||_F^2 (A: lower-triangular ones), numpy float64 and
scipy Nelder-Mead from fixed starts, rounded to float32 (the numbers the device
uses are then exactly those the accounting uses): deterministic in
(n, b, d) and cached, so a resumed run rebuilds the same strategy.
"""

import functools
import math
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
import scipy.signal

from dpjax.privacy import accounting
from dpjax.privacy import noise as noise_lib
from dpjax.privacy import redact


class Strategy(NamedTuple):
  """BLT parameters: buffer decays theta in (0, 1) and weights omega > 0."""
  theta: tuple[float, ...]
  omega: tuple[float, ...]


def _polys(theta, omega) -> tuple[np.ndarray, np.ndarray]:
  """(P, Q), ascending powers: the generating function of C is P(x)/Q(x),
  Q = prod_i (1 - theta_i x), P = Q + x sum_i omega_i prod_{j!=i}(..)."""
  theta, omega = np.asarray(theta, np.float64), np.asarray(omega, np.float64)
  q = np.ones(1)
  for t in theta:
    q = np.convolve(q, [1.0, -t])
  p = q.copy()
  for i, w in enumerate(omega):
    r = np.ones(1)
    for j, t in enumerate(theta):
      if j != i:
        r = np.convolve(r, [1.0, -t])
    p[1:len(r) + 1] += w * r
  return p, q


def _impulse(steps: int) -> np.ndarray:
  return np.eye(1, steps)[0]


def coefficients(theta, omega, steps: int) -> np.ndarray:
  """float64[steps]: c, the first column of C (c_0 = 1).

  >>> coefficients((0.5,), (0.25,), 4).tolist()
  [1.0, 0.25, 0.125, 0.0625]
  """
  k = np.arange(1, steps)[:, None]
  c = np.asarray(omega) * np.asarray(theta, np.float64) ** (k - 1)
  return np.concatenate([[1.0], c.sum(1)])


def inverse_coefficients(theta, omega, steps: int) -> np.ndarray:
  """float64[steps]: the first column of C^{-1} (Q/P as a power series,
  the impulse response of the streaming recursion)."""
  p, q = _polys(theta, omega)
  return scipy.signal.lfilter(q, p, _impulse(steps))


def strategy_matrix(theta, omega, steps: int) -> np.ndarray:
  """float64[steps, steps]: C, lower-triangular Toeplitz."""
  c = coefficients(theta, omega, steps)
  i = np.arange(steps)
  d = i[:, None] - i[None, :]
  return np.where(d >= 0, c[np.clip(d, 0, None)], 0.0)


def check_strategy(theta, omega) -> None:
  """Refuses a strategy outside the range where `prefix_sensitivity` is
  proven (module doc): d >= 1 buffers, every theta_i in (0, 1), every
  omega_i > 0 (finite). Outside it the closed form can underestimate the
  worst participation set by far (negative omega, theta > 1 or < 0), and
  the exact maximum is a hard combinatorial search.

  Raises:
    ValueError: naming the parameter, its value and the allowed range.
  """
  theta, omega = tuple(theta), tuple(omega)
  if not theta or len(theta) != len(omega):
    raise ValueError(f"BLT strategy needs as many omega as theta, >= 1 "
                     f"each: got {len(theta)} theta, {len(omega)} omega")
  for i, t in enumerate(theta):
    if not 0.0 < float(t) < 1.0:
      raise ValueError(f"BLT strategy theta[{i}]={float(t)!r} is outside the "
                       "allowed range (0, 1), where its sensitivity is "
                       "proven; use privacy.blt.optimize")
  for i, w in enumerate(omega):
    if not (math.isfinite(float(w)) and float(w) > 0.0):
      raise ValueError(f"BLT strategy omega[{i}]={float(w)!r} is outside the "
                       "allowed range (0, inf), where its sensitivity is "
                       "proven; use privacy.blt.optimize")


def prefix_sensitivity(theta, omega, steps: int,
                       min_separation: int = 1) -> np.ndarray:
  """float64[steps + 1]: Delta_t, t = 0..steps (module doc; Delta_0 = 0).

  Raises:
    ValueError: for a strategy outside the proven range (`check_strategy`).
  """
  check_strategy(theta, omega)
  p, q = _polys(theta, omega)
  y = scipy.signal.lfilter(p, q, (np.arange(steps) % min_separation) == 0)
  return np.sqrt(np.concatenate([[0.0], np.cumsum(y * y)]))


def sensitivity(theta, omega, steps: int, min_separation: int = 1) -> float:
  """Delta_n: the largest ||C 1_S|| over participation sets with gaps
  >= min_separation in `steps` steps."""
  return float(prefix_sensitivity(theta, omega, steps, min_separation)[-1])


def loss(theta, omega, steps: int, min_separation: int = 1) -> float:
  """Delta_n^2 ||A C^{-1}||_F^2: total squared error of the noisy prefix
  sums per unit sigma^2 C_clip^2; with c' = `inverse_coefficients`,
  ||A C^{-1}||_F^2 = sum_m (n - m) (c'_0 + .. + c'_m)^2 (O(n))."""
  return _loss_fn(steps, min_separation)(theta, omega)


def _loss_fn(steps: int, min_separation: int):
  weights = np.arange(steps, 0, -1, dtype=np.float64)
  impulse = _impulse(steps)
  ones = ((np.arange(steps) % min_separation) == 0).astype(np.float64)

  def fn(theta, omega) -> float:
    p, q = _polys(theta, omega)
    with np.errstate(all="ignore"):
      s = np.cumsum(scipy.signal.lfilter(q, p, impulse))
      y = scipy.signal.lfilter(p, q, ones)
      out = float(np.dot(y, y) * np.dot(weights, s * s))
    return out if math.isfinite(out) else math.inf
  return fn


_sensitivity = sensitivity  # blt_noise's argument shadows the name.


@functools.lru_cache(maxsize=64)
def optimize(steps: int, min_separation: int = 1,
             buffers: int = 4) -> Strategy:
  """The BLT strategy minimising `loss` (deterministic; cached)."""
  if buffers < 1:
    raise ValueError(f"config.privacy.blt_buffers={buffers} is invalid: "
                     "use >= 1")
  if not 1 <= min_separation <= steps:
    raise ValueError(f"config.privacy.min_separation={min_separation} is "
                     f"invalid: use 1 <= min_separation <= steps={steps}")
  d = buffers
  loss_fn = _loss_fn(steps, min_separation)

  def unpack(x):
    with np.errstate(over="ignore"):
      return 1.0 / (1.0 + np.exp(-x[:d])), np.exp(x[d:])

  def f(x):  # log loss; a huge finite value where C^{-1} diverges.
    value = loss_fn(*unpack(x))
    return math.log(value) if 0 < value < math.inf else 1e3

  # Starts: 1 - theta log-spread over [1/n, 1/2], omega a multiple of it;
  # Nelder-Mead (the loss is flat far out and infinite where C^{-1}
  # diverges, which finite-difference gradients handle badly); the best
  # start is restarted (the simplex may have collapsed).
  minimize = lambda x: scipy.optimize.minimize(
      f, x, method="Nelder-Mead",
      options=dict(maxiter=200 * d, xatol=1e-7, fatol=1e-10))
  one_minus = np.geomspace(0.5, 1.0 / max(steps, 4), d)
  best = min((minimize(np.concatenate([np.log((1 - one_minus) / one_minus),
                                       np.log(scale * one_minus)]))
              for scale in (1e-3, 0.05, 0.5)), key=lambda r: r.fun)
  for _ in range(2):
    best = min(best, minimize(best.x), key=lambda r: r.fun)
  theta, omega = unpack(best.x)
  # float32-exact values, strictly inside the domain.
  theta = np.clip(theta.astype(np.float32), np.float32(1e-6),
                  np.nextafter(np.float32(1), np.float32(0)))
  omega = np.maximum(omega.astype(np.float32), np.float32(1e-12))
  return Strategy(tuple(float(t) for t in theta),
                  tuple(float(w) for w in omega))


class BLTState(NamedTuple):
  """count: int32 updates so far; rng_key: the secret root key (z_t from
  fold_in(rng_key, t), as `add_noise`); buffers: the d buffers s_i, each
  like the params (float32)."""
  count: jax.Array
  rng_key: jax.Array
  buffers: tuple
  __repr__ = redact.namedtuple_repr("rng_key")  # Never print the key.


def blt_noise(sensitivity: noise_lib.Sensitivity, noise_multiplier: float,
              expected_batch_size: float, strategy: Strategy, steps: int,
              min_separation: int = 1, seed: noise_lib.Seed = None,
              initial_count: int = 0) -> optax.GradientTransformation:
  """`add_noise` with BLT-correlated noise, as an optax transformation.

  update(clipped_sum) = (clipped_sum + sigma C_clip Delta_n w_t) / batch,
  w_t = (C^{-1} z)_t with z_t the standard normal draw `add_noise` would
  make at the same count and key; Delta_n = `sensitivity(..., steps,
  min_separation)`. The guarantee (module doc) needs b-cyclic Poisson
  sampling with b = min_separation. Seed: as `add_noise` (None: a secret
  root key from OS entropy at `init`).
  """
  theta, omega = strategy
  scale = _sensitivity(theta, omega, steps, min_separation)
  c_clip = noise_lib.l2_sensitivity(sensitivity)
  if expected_batch_size <= 0:
    raise ValueError(
        f"expected_batch_size must be > 0, got {expected_batch_size}.")

  def init_fn(params):
    base = noise_lib.init_state(seed, initial_count)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return BLTState(base.count, base.rng_key, tuple(zeros for _ in theta))

  def update_fn(updates, state, params=None):
    del params
    key = jax.random.fold_in(state.rng_key, state.count)
    w = noise_lib.standard_normal_like(updates, key)  # add_noise's z_t.
    for wi, s in zip(omega, state.buffers):
      w = jax.tree.map(lambda a, b, wi=wi: a - np.float32(wi) * b, w, s)
    buffers = tuple(
        jax.tree.map(lambda b, n, ti=ti: np.float32(ti) * b + n, s, w)
        for ti, s in zip(theta, state.buffers))
    std = np.float32(noise_multiplier * c_clip * scale)
    out = jax.tree.map(
        lambda g, n: (g.astype(n.dtype) + std * n) / expected_batch_size,
        updates, w)
    return out, BLTState(state.count + 1, state.rng_key, buffers)

  return optax.GradientTransformation(init_fn, update_fn)


def epsilon(noise_multiplier: float, delta: float,
            accountant: str = "pld") -> float:
  """Epsilon of a whole BLT phase: ONE Gaussian mechanism with multiplier
  sigma (module doc), whatever q, n and b."""
  if noise_multiplier == 0:
    return math.inf
  return accounting.event_epsilon(
      dp_accounting.GaussianDpEvent(noise_multiplier), delta, accountant)


def calibrate_noise_multiplier(target_epsilon: float, delta: float,
                               accountant: str = "pld",
                               rtol: float = 1e-3) -> float:
  """The smallest sigma (to rtol) whose `epsilon` is <= target_epsilon."""
  if target_epsilon <= 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
  return accounting.bisect_sigma(
      lambda s: epsilon(s, delta, accountant), target_epsilon, 1.0, rtol)


def ledger_rho(strategy: Strategy, steps: int, min_separation: int,
               noise_multiplier: float, start: int, count: int) -> float:
  """The privacy cost of phase steps [start, start + count), as rho =
  1 / sigma_eff^2 of Gaussian mechanisms (rho adds up under composition):
  (Delta_{start+count}^2 - Delta_start^2) / (sigma Delta_n)^2."""
  if noise_multiplier == 0:
    return math.inf
  d2 = _prefix_sq(strategy, steps, min_separation)
  return float((d2[start + count] - d2[start]) /
               (noise_multiplier ** 2 * d2[steps]))


@functools.lru_cache(maxsize=64)
def _prefix_sq(strategy: Strategy, steps: int, min_separation: int):
  return prefix_sensitivity(*strategy, steps, min_separation) ** 2


__all__ = ["BLTState", "Strategy", "blt_noise", "calibrate_noise_multiplier",
           "check_strategy", "coefficients", "epsilon", "inverse_coefficients", "ledger_rho",
           "loss", "optimize", "prefix_sensitivity", "sensitivity",
           "strategy_matrix"]
