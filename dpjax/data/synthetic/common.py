"""Counter-based randomness and pixel grids shared by the generators.

A record is a pure function of (seed, split, index): ``hash_uniform`` draws
from a SplitMix64 hash of integer keys, so any index costs the same.
"""

import zlib

import numpy as np


def split_tag(split: str) -> int:
  """A 32-bit tag of a split name (disjoint random streams per split)."""
  return zlib.crc32(split.encode()) & 0xFFFFFFFF


def hash_uniform(*keys: int, n: int) -> np.ndarray:
  """n uniform floats in [0, 1) from integer keys (SplitMix64, vectorized).

  Args:
    *keys: non-negative ints (seed, tags, index, ...).
    n: number of draws.

  Returns:
    float64[n], a deterministic function of (keys, position).
  """
  h = 0x9E3779B97F4A7C15
  for k in keys:
    h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9
         + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  with np.errstate(over="ignore"):
    z = np.uint64(h) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(
        0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[None, :], c[:, None]  # x [1, W], y [H, 1]
