r"""Noise in the model at equal epsilon: DP-SGD (amplified by Poisson
sampling) vs BandMF (b-cyclic, amplified at rate q*b) vs BLT (b-cyclic, no
amplification), as the RMS error of the noisy prefix sums of the updates
(the parameters, for SGD), per unit sigma-free clip norm and step:

  DP-SGD: sigma^2 ||A||_F^2;  BandMF: sigma^2 ||A C^{-1}||_F^2;
  BLT: sigma^2 Delta_n^2 ||A C^{-1}||_F^2 (privacy.blt.loss),

each sigma calibrated (PLD) to the same (epsilon, delta); the error is
sqrt(that / n) / (sigma of DP-SGD's noise per step), i.e. relative to what
DP-SGD would have with no correlation. A proxy: training dynamics (learning
rate, momentum, clipping bias) are not in it.

Run (by hand; prints a markdown table, about a minute):
  python benchmarks/noise_error.py
"""

import math

import numpy as np
import scipy.signal

from dpjax import privacy
from dpjax.privacy import bandmf
from dpjax.privacy import blt

# (name, N, expected batch, steps, epsilon); b = N // batch (q*b ~ 1: every
# example once per epoch, in a fixed partition), delta = N^-1.1.
SETTINGS = (
    ("dp_linear (N=1500, B=128, 150 steps)", 1500, 128, 150, 2.0),
    ("N=60k, B=600, 1000 steps (10 epochs)", 60_000, 600, 1000, 8.0),
    ("N=60k, B=600, 1000 steps (10 epochs)", 60_000, 600, 1000, 1.0),
    ("N=60k, B=6000, 1000 steps (100 epochs)", 60_000, 6000, 1000, 8.0),
    ("N=1M, B=1000, 2000 steps (2 epochs)", 1_000_000, 1000, 2000, 8.0),
)


def _prefix_error(inverse_coefficients: np.ndarray) -> float:
  """||A C^{-1}||_F^2 for a Toeplitz C^{-1} of these coefficients."""
  n = inverse_coefficients.size
  s = np.cumsum(inverse_coefficients)
  return float(np.dot(np.arange(n, 0, -1), s * s))


def row(name, n_examples, batch, steps, eps):
  q, b = batch / n_examples, n_examples // batch
  delta = n_examples ** -1.1
  ident = steps * (steps + 1) / 2
  s_dp = privacy.calibrate_noise_multiplier(eps, q, steps, delta)
  out = {"setting": f"{name}, eps={eps:g}", "b": b, "DP-SGD sigma": s_dp}
  bands = min(b, steps)
  s_bmf = bandmf.calibrate_noise_multiplier(eps, q, steps, delta, bands)
  c = bandmf.coefficients(bands)
  inv = scipy.signal.lfilter([1.0], c, np.eye(1, steps)[0])
  out["BandMF sigma"] = s_bmf
  out["BandMF error"] = math.sqrt(s_bmf ** 2 * _prefix_error(inv) /
                                  (s_dp ** 2 * ident))
  s_blt = blt.calibrate_noise_multiplier(eps, delta)
  strategy = blt.optimize(steps, min(b, steps), 4)
  out["BLT sigma"] = s_blt
  out["BLT Delta_n"] = blt.sensitivity(*strategy, steps, min(b, steps))
  out["BLT error"] = math.sqrt(s_blt ** 2 * blt.loss(
      *strategy, steps, min(b, steps)) / (s_dp ** 2 * ident))
  return out


def main():
  rows = [row(*s) for s in SETTINGS]
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                            for v in r.values()) + " |")


if __name__ == "__main__":
  main()
