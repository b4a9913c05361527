"""Counter-based randomness and pixel grids shared by the generators.

A record is a pure function of (seed, split, index): ``hash_uniform`` draws
from a SplitMix64 hash of integer keys, so any index costs the same.
"""

import zlib

import numpy as np


def split_tag(split: str) -> int:
  """A 32-bit tag of a split name (disjoint random streams per split)."""
  return zlib.crc32(split.encode()) & 0xFFFFFFFF


def hash_u64(*keys: int, indices: np.ndarray) -> np.ndarray:
  """uint64 per index from integer keys (SplitMix64, vectorized).

  Args:
    *keys: non-negative ints (seed, tags, ...).
    indices: non-negative ints; distinct indices give distinct outputs
      (an odd-multiplier step then a bijective mix).

  Returns:
    uint64[len(indices)], a deterministic function of (keys, index).
  """
  h = 0x9E3779B97F4A7C15
  for k in keys:
    h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9
         + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  with np.errstate(over="ignore"):
    z = np.uint64(h) + (np.asarray(indices, np.uint64) + np.uint64(1)) * (
        np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniform(*keys: int, n: int) -> np.ndarray:
  """n uniform floats in [0, 1) from integer keys: float64[n], a
  deterministic function of (keys, position) (``hash_u64`` of 0..n-1)."""
  z = hash_u64(*keys, indices=np.arange(n, dtype=np.uint64))
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[None, :], c[:, None]  # x [1, W], y [H, 1]
