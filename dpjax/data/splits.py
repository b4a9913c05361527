"""Deterministic disjoint splits of one source into index-remapped views.

DP continual pretraining (Bu et al. 2024) trains non-privately on a public
share of a dataset and then with DP on the rest. The private phase must see
a source over ONLY the private examples, so that the Poisson sampler over
``[0, N_priv)`` cannot produce a public example and the accountant's N is
``N_priv``. ``public_private_split(source, fraction, seed)`` returns two
``Subset`` views for that.

The split is a seeded affine permutation of ``[0, N)``: position ``p`` maps
to ``(a * p + b) mod N`` with ``gcd(a, N) = 1`` (a bijection), public =
positions ``[0, n_pub)``, private = ``[n_pub, N)``. It needs O(1) memory
(no array of size N, so views pickle cheaply into Grain workers), is a pure
function of ``(N, fraction, seed)``, and spreads each share evenly over the
source's index range (a class-sorted source gives a roughly class-balanced
public share).
"""

import math
from typing import Any

import numpy as np

_MULTIPLIER_TAG = 0x9E3779B97F4A7C15  # odd 64-bit golden-ratio constant.


def affine_permutation(num: int, seed: int) -> tuple[int, int]:
  """(a, b) with gcd(a, num) = 1: p -> (a p + b) mod num permutes [0, num).

  Args:
    num: N >= 1.
    seed: any integer.

  Returns:
    The multiplier a in [1, num) (1 when num <= 2) and offset b in [0, num).
  """
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  rng = np.random.default_rng([seed & 0xFFFFFFFF, _MULTIPLIER_TAG & 0xFFFF])
  b = int(rng.integers(num))
  if num <= 2:
    return 1, b
  # A multiplier near num * (golden ratio - 1), moved to the next coprime.
  a = int(num * 0.6180339887 + rng.integers(max(1, num // 16))) % num or 1
  while math.gcd(a, num) != 1:
    a = a % (num - 1) + 1
  return a, b


class Subset:
  """A random-access view of ``source`` at positions ``[start, stop)`` of
  the permutation ``p -> (a p + b) mod len(source)``.

  ``view[i]`` is ``source[(a * (start + i) + b) % N]`` for ``0 <= i <
  len(view)``; any other ``i`` raises IndexError (a sampler bug can never
  silently read outside the view).
  """

  def __init__(self, source: Any, start: int, stop: int, a: int = 1,
               b: int = 0):
    n = len(source)
    if not 0 <= start <= stop <= n:
      raise ValueError(f"need 0 <= start={start} <= stop={stop} <= N={n}")
    if math.gcd(a, n) != 1 and n > 1:
      raise ValueError(f"multiplier a={a} is not coprime with N={n}")
    self.source, self.start, self.stop = source, int(start), int(stop)
    self.a, self.b, self._n = int(a), int(b), n

  def __len__(self) -> int:
    return self.stop - self.start

  def source_index(self, index: int) -> int:
    """The index in the underlying source of view index ``index``."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    return (self.a * (self.start + index) + self.b) % self._n

  def source_indices(self) -> np.ndarray:
    """int64[len(self)]: all underlying indices (tests / small N only)."""
    p = np.arange(self.start, self.stop, dtype=np.int64)
    return (p * self.a + self.b) % self._n if self._n else p

  def __getitem__(self, index: int) -> Any:
    return self.source[self.source_index(index)]

  def __repr__(self) -> str:
    return (f"Subset({self.source!r}, positions [{self.start}, {self.stop})"
            f" of p -> ({self.a} p + {self.b}) mod {self._n})")


def num_public(num_examples: int, fraction: float) -> int:
  """round(fraction * N), validated: 0 < n_pub < N."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"public fraction must be in (0, 1), got {fraction}")
  n_pub = int(round(fraction * num_examples))
  if not 0 < n_pub < num_examples:
    raise ValueError(f"public fraction {fraction} of N={num_examples} leaves "
                     f"an empty share ({n_pub} public examples)")
  return n_pub


def public_private_split(source: Any, fraction: float,
                         seed: int) -> tuple[Subset, Subset]:
  """Splits ``source`` into disjoint (public, private) views.

  Guarantee: every source index belongs to exactly one view (the views are
  the two halves of one permutation of ``[0, N)``); the split depends only on
  ``(len(source), fraction, seed)``.

  Args:
    source: random-access source (``len`` + ``getitem``).
    fraction: public share in (0, 1) (Bu et al.: 0.1).
    seed: split seed.

  Returns:
    (public view of round(fraction * N) examples, private view of the rest).
  """
  n = len(source)
  n_pub = num_public(n, fraction)
  a, b = affine_permutation(n, seed)
  return Subset(source, 0, n_pub, a, b), Subset(source, n_pub, n, a, b)


class Appended:
  """``source`` followed by a list of extra records (e.g. audit canaries).

  ``view[i]`` is ``source[i]`` for ``i < len(source)`` and
  ``extra[i - len(source)]`` after; the extra records become ordinary members
  of the dataset (sampled, clipped and accounted like any other).

  >>> v = Appended(["a", "b"], ["z"])
  >>> len(v), v[1], v[2]
  (3, 'b', 'z')
  """

  def __init__(self, source: Any, extra: list[Any]):
    self.source, self.extra = source, list(extra)
    self._n = len(source)

  def __len__(self) -> int:
    return self._n + len(self.extra)

  def __getitem__(self, index: int) -> Any:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    return self.source[index] if index < self._n else self.extra[
        index - self._n]

  def __repr__(self) -> str:
    return f"Appended({self.source!r}, +{len(self.extra)} records)"
