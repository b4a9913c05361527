"""Banded matrix-factorization noise (BandMF): Gaussian noise correlated
across steps, and its amplified accounting.

DP-MF (Choquette-Choo et al., NeurIPS 2023): step t adds w_t = (C^{-1} z)_t
to the clipped sum instead of a fresh z_t, for a lower-triangular banded
Toeplitz strategy C with `bands` = b diagonals (c_0 .. c_{b-1}). The noisy
sums x_t + w_t are a post-processing of C x + z, a Gaussian mechanism whose
sensitivity is C's largest column norm, 1 here by scaling. Anti-correlated
noise cancels in the running sum of updates, which is what the parameters
are: less noise in the model at the same epsilon.

Formal guarantee (add/remove-one, example level): with every clipped sum of
sensitivity C_clip and b-cyclic Poisson sampling -- the examples split into
b partitions fixed for the run, at step t partition t mod b Poisson-sampled
at rate q_b = q * b -- an example's participations are >= b steps apart,
where the banded columns do not overlap: the run is ceil(T / b)
independent Poisson-subsampled Gaussian mechanisms (rate q_b, noise
multiplier sigma), i.e.
`epsilon(...)` below, DP-SGD's accounting with (q b, ceil(T / b)). b = 1 is
DP-SGD exactly (same noise, same epsilon). The sampler
(`privacy.sampling.sample_cyclic_indices`) draws each example's partition
secretly and i.i.d. uniform, independent of the data, not as i mod b (which
breaks add/remove adjacency: removing one example shifts every later one
into another partition); given the partitions the bound above holds, and a
mixture of such mechanisms over the differing example's partition meets it
by joint convexity (the sampler's docstring has the argument).

Strategy: the banded square root of the prefix-sum workload (Kalinin &
Lampert, NeurIPS 2024), c_j = binom(2j, j) / 4^j for j < b, scaled to unit
norm: a closed form, no optimisation. The recursion
w_t = (z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0 keeps the last b - 1 noise
vectors in the optimizer state (sharded like the params, checkpointed).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.privacy import accounting
from dpjax.privacy import noise as noise_lib
from dpjax.privacy import redact


def coefficients(bands: int) -> np.ndarray:
  """float64[bands]: the first column of C (banded square root, unit norm).

  >>> coefficients(1).tolist()
  [1.0]
  >>> [round(float(c), 4) for c in coefficients(3)]  # [1, 1/2, 3/8] / norm
  [0.848, 0.424, 0.318]
  """
  if bands < 1:
    raise ValueError(f"config.privacy.bands={bands} is invalid: use >= 1")
  c = np.ones(bands)
  for j in range(1, bands):
    c[j] = c[j - 1] * (2 * j - 1) / (2 * j)
  return c / np.linalg.norm(c)


def strategy_matrix(bands: int, steps: int) -> np.ndarray:
  """float64[steps, steps]: C, lower-triangular banded Toeplitz."""
  c = coefficients(bands)
  out = np.zeros((steps, steps))
  for j in range(min(bands, steps)):
    out += np.diag(np.full(steps - j, c[j]), -j)
  return out


class BandMFState(NamedTuple):
  """count: int32 updates so far; rng_key: the secret root key (step t draws
  z_t with fold_in(rng_key, t), as `add_noise`); past: the last b - 1 noise
  vectors w, newest first, each like the params (empty tuple for b = 1)."""
  count: jax.Array
  rng_key: jax.Array
  past: tuple
  __repr__ = redact.namedtuple_repr("rng_key")  # Never print the key.


def bandmf_noise(sensitivity: noise_lib.Sensitivity, noise_multiplier: float,
                 expected_batch_size: float, bands: int,
                 seed: noise_lib.Seed = None, initial_count: int = 0
                 ) -> optax.GradientTransformation:
  """`add_noise` with BandMF-correlated noise, as an optax transformation.

  update(clipped_sum) = (clipped_sum + sigma C_clip w_t) / expected batch,
  w_t = (C^{-1} z)_t with z_t the standard normal draw `add_noise` would
  make at the same count and key (so bands=1 returns exactly its output).
  The privacy guarantee needs b-cyclic Poisson sampling (module doc). Seed:
  as `add_noise` (None: a secret root key from OS entropy at `init`).
  """
  c = coefficients(bands)
  c_clip = noise_lib.l2_sensitivity(sensitivity)
  if expected_batch_size <= 0:
    raise ValueError(
        f"expected_batch_size must be > 0, got {expected_batch_size}.")

  def init_fn(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(
        p.dtype, jnp.float32)), params)
    base = noise_lib.init_state(seed, initial_count)
    return BandMFState(base.count, base.rng_key,
                       tuple(zeros for _ in range(bands - 1)))

  def update_fn(updates, state, params=None):
    del params
    key = jax.random.fold_in(state.rng_key, state.count)
    z = noise_lib.standard_normal_like(updates, key)  # add_noise's z_t.
    # Steps before the phase's first have no noise: their w is zero.
    w = z
    for j, past in enumerate(state.past, start=1):
      w = jax.tree.map(lambda a, b, cj=c[j]: a - cj * b, w, past)
    w = jax.tree.map(lambda a: a / c[0], w)
    std = noise_multiplier * c_clip
    out = jax.tree.map(
        lambda g, n: (g.astype(n.dtype) + std * n) / expected_batch_size,
        updates, w)
    past = ((w,) + state.past[:-1]) if state.past else ()
    return out, BandMFState(state.count + 1, state.rng_key, past)

  return optax.GradientTransformation(init_fn, update_fn)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
            delta: float, bands: int, accountant: str = "pld") -> float:
  """Epsilon of BandMF with b-cyclic Poisson sampling (module doc):
  DP-SGD's with sampling rate q b over ceil(T / b) steps.

  >>> epsilon(1.0, 0.01, 100, 1e-5, 1) == accounting.epsilon(
  ...     1.0, 0.01, 100, 1e-5)
  True
  """
  return accounting.epsilon(noise_multiplier,
                            cyclic_sampling_rate(sampling_rate, bands),
                            math.ceil(steps / bands), delta, accountant)


def cyclic_sampling_rate(sampling_rate: float, bands: int) -> float:
  """q b: the Poisson rate within one of b partitions (must be <= 1)."""
  q = sampling_rate * bands
  if q > 1:
    raise ValueError(
        f"config.privacy.bands={bands}: the per-partition sampling rate "
        f"q*b = {q:.3g} exceeds 1 (batch larger than a partition): use "
        "fewer bands or a smaller train.batch_size")
  return q


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float,
                               steps: int, delta: float, bands: int,
                               accountant: str = "pld") -> float:
  """The smallest sigma whose BandMF `epsilon` is <= target_epsilon."""
  return accounting.calibrate_noise_multiplier(
      target_epsilon, cyclic_sampling_rate(sampling_rate, bands),
      math.ceil(steps / bands), delta, accountant=accountant)


__all__ = ["BandMFState", "bandmf_noise", "calibrate_noise_multiplier",
           "coefficients", "cyclic_sampling_rate", "epsilon",
           "strategy_matrix"]
