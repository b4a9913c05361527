"""Duplicate detection for data preparation: exact and near duplicates.

Why it is here: DP counts each *record* as a privacy unit. A picture that
appears k times in the training set is k units of one person's
contribution, so its effective privacy loss is that of group privacy with
group size k. Dropping duplicates before training makes "one record = one
contribution" closer to true (PRIVACY.md).

* Exact: a 128-bit BLAKE2b hash of the DECODED pixels (RGB, with the
  shape), not of the file bytes, so a lossless re-encoding (another PNG
  compressor, PNG <-> lossless WebP) of the same picture is caught too.
* Near: a 64-bit difference hash (dHash, Krawetz): the grayscale image
  shrunk to 9x8, one bit per horizontally adjacent pair "left brighter than
  right". Re-compression, small resizes and slight colour shifts change few
  bits; a different picture differs in about half. Two images are near
  duplicates when their Hamming distance is <= a threshold.

Decisions are global and deterministic: records are visited in a fixed
order (input shard, then position) and the FIRST of each exact duplicate
group is kept, whichever worker hashed it (``keep_first_exact``); a near
duplicate is a record within the threshold of ANY earlier record
(``NearIndex`` holds every record), so one record added or removed changes
only the fate of its own near duplicates (``prepare.plan.duplicates``).
"""

import hashlib

import numpy as np

HASH_BYTES = 16  # Exact hash width: collisions are ~N^2 / 2^129, nil at 2e9.
_DHASH_W, _DHASH_H = 9, 8


def pixel_hash(pixels: np.ndarray) -> bytes:
  """128-bit content hash of a decoded uint8 image (its shape included)."""
  pixels = np.ascontiguousarray(pixels, np.uint8)
  h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"dpjax-pixels")
  h.update(np.asarray(pixels.shape, np.int64).tobytes())
  h.update(pixels.tobytes())
  return h.digest()


def dhash(image) -> int:
  """64-bit difference hash of a PIL image (see the module docstring)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = image.convert("L").resize((_DHASH_W, _DHASH_H),
                                    Image.Resampling.BILINEAR)
  g = np.asarray(small, np.int16)
  bits = (g[:, :-1] > g[:, 1:]).reshape(-1)
  return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
  """Number of differing bits of two 64-bit hashes."""
  return (int(a) ^ int(b)).bit_count()


def keep_first_exact(hashes: np.ndarray) -> np.ndarray:
  """For each row of ``hashes`` (uint8[N, HASH_BYTES], in visiting order),
  the row index of the first row with the same hash (itself if first).

  Vectorised (a sort), so it runs over the whole data set at once: a
  duplicate in another shard or worker is found like one in the same shard.
  """
  n = len(hashes)
  if n == 0:
    return np.zeros((0,), np.int64)
  keys = np.ascontiguousarray(hashes).view(f"V{HASH_BYTES}").reshape(n)
  _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  return first[inverse.reshape(n)].astype(np.int64)


class NearIndex:
  """dHashes, searchable for one within a Hamming ``threshold``.

  Multi-index hashing: the 64 bits are cut into ``threshold + 1`` bands; two
  hashes within the threshold agree exactly on at least one band
  (pigeonhole), so only records sharing a band value are compared. Memory
  grows with the records added (one dict entry per band per record).
  """

  def __init__(self, threshold: int):
    if not 0 <= threshold < 32:
      raise ValueError(f"--hamming_threshold={threshold}: use 0..31 (bits "
                       "of a 64-bit dHash; small values, e.g. 4-8).")
    self.threshold = threshold
    edges = np.linspace(0, 64, threshold + 2).astype(int)
    self._bands = [(int(a), int(b - a)) for a, b in zip(edges, edges[1:])]
    self._tables = [dict() for _ in self._bands]
    self._hashes: list[int] = []

  def _band_values(self, h: int) -> list[int]:
    return [(h >> shift) & ((1 << width) - 1) for shift, width in self._bands]

  def find(self, h: int) -> int:
    """Id of the first added hash within the threshold of ``h``, else -1."""
    best = -1
    for table, v in zip(self._tables, self._band_values(h)):
      for j in table.get(v, ()):
        if (best < 0 or j < best) and hamming(h, self._hashes[j]) <= (
            self.threshold):
          best = j
    return best

  def add(self, h: int) -> int:
    """Adds ``h``; returns its id (ids count added hashes from 0)."""
    j = len(self._hashes)
    self._hashes.append(int(h))
    for table, v in zip(self._tables, self._band_values(h)):
      table.setdefault(v, []).append(j)
    return j
