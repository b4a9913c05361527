"""Exact open-set verification and retrieval metrics (DP-FedEmb).

Embeddings are L2-normalised and every pair (i, j), i < j, of the eval set is
scored by s = 1 - ||x_i - x_j||^2 / 4 (float32; ||x-y||^2 expanded as
||x||^2 + ||y||^2 - 2 x.y with a full-precision matmul). A pair is positive
when both share an identity, negative otherwise. Unlike the reference code
(within-batch, approximate), everything here is over ALL pairs:

* ``recall_at_far_{f}`` (true accept rate): with n_neg negative pairs and
  m = floor(f * n_neg) allowed false accepts, the threshold t is the (m+1)-th
  largest negative similarity and a pair is accepted iff s > t, so the
  realised FAR = #{neg > t} / n_neg <= f (ties can only lower it). Recall is
  #{pos > t} / n_pos. If m >= n_neg every pair is accepted (t = -inf).
* ``recall_at_1``: the nearest neighbour (excluding self) of each query has
  the same identity; queries whose identity has no other example are skipped.

Exact threshold without holding the ~2e8 negative scores (N = 20k): similarity
is computed in row blocks (never an N x N matrix) and each float32 score is
mapped to an order-preserving uint32 key. A two-pass radix select then finds
the exact (m+1)-th largest key: pass 1 histograms the top 16 bits of the
negative (and positive) keys, which locates the 16-bit bin holding the
threshold and the rank inside it; pass 2 recomputes the same blocks and
histograms the low 16 bits of the keys inside that bin. Both passes use the
same jitted function on identical shapes, so the scores are bitwise equal.
Memory is O(block * N + 2^17); counts are accumulated on host in int64.
"""

from collections.abc import Callable, Sequence
from fractions import Fraction
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.evaluate import linear_probe

_HALF = 1 << 16  # Bins per 16-bit digit.


def embeddings(embed_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
               images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """L2-normalised embeddings, float32 [N, D]."""
  e = linear_probe.features(embed_fn, params, images, batch_size)
  return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def similarity(xq: jax.Array, x: jax.Array) -> jax.Array:
  """s = 1 - ||xq_i - x_j||^2 / 4 for [Q, D] x [N, D] -> [Q, N] float32."""
  dots = jnp.matmul(xq, x.T, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.sum(xq * xq, 1)[:, None] + jnp.sum(x * x, 1)[None, :] - 2.0 * dots
  return 1.0 - d2 / 4.0


def float_to_key(s: jax.Array) -> jax.Array:
  """Order-preserving map float32 -> uint32 (a < b iff key(a) < key(b))."""
  s = jnp.where(s == 0, jnp.float32(0), s)  # -0.0 and +0.0 get one key.
  b = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def key_to_float(key: int) -> float:
  """Inverse of float_to_key for one key (host side)."""
  b = key & 0x7FFFFFFF if key >> 31 else (~key) & 0xFFFFFFFF
  return float(np.array([b], np.uint32).view(np.float32)[0])


def _pairs(xq, idq, rowq, x, ids):
  """Keys, upper-triangle/validity mask and same-identity mask of a block."""
  s = similarity(xq, x)
  cols = jnp.arange(x.shape[0])
  upper = (cols[None, :] > rowq[:, None]) & (rowq[:, None] >= 0)
  same = idq[:, None] == ids[None, :]
  return s, float_to_key(s), upper, same


def _hist(bins, is_pos, mask):
  """[2 * 2^16] counts: negatives in [0, 2^16), positives in [2^16, 2^17)."""
  idx = bins.astype(jnp.int32) + _HALF * is_pos.astype(jnp.int32)
  idx = jnp.where(mask, idx, 2 * _HALF)  # Out of range: dropped.
  return jnp.zeros(2 * _HALF, jnp.int32).at[idx.ravel()].add(1, mode="drop")


@jax.jit
def _pass1(xq, idq, rowq, x, ids):
  """High-digit histogram and nearest-neighbour hits of one row block."""
  s, key, upper, same = _pairs(xq, idq, rowq, x, ids)
  hist = _hist(key >> 16, same, upper)
  is_self = jnp.arange(x.shape[0])[None, :] == rowq[:, None]
  nn = jnp.argmax(jnp.where(is_self, -jnp.inf, s), axis=1)
  hit = ids[nn] == idq
  has_match = jnp.any(same & ~is_self, axis=1) & (rowq >= 0)
  return hist, jnp.sum(hit & has_match), jnp.sum(has_match)


@functools.partial(jax.jit, static_argnames="num_bins")
def _pass2(xq, idq, rowq, x, ids, hi_bins, num_bins):
  """Low-digit histograms inside each target's high bin: [T, 2^17]."""
  _, key, upper, same = _pairs(xq, idq, rowq, x, ids)
  hi, lo = key >> 16, key & 0xFFFF
  return jnp.stack([_hist(lo, same, upper & (hi == hi_bins[t]))
                    for t in range(num_bins)])


def _blocks(emb, ids, block_rows):
  """Yields padded (xq, idq, rowq) row blocks; padded rows have rowq = -1."""
  n = len(emb)
  for start in range(0, n, block_rows):
    rows = np.arange(start, start + block_rows)
    valid = rows < n
    take = np.where(valid, rows, 0)
    yield emb[take], ids[take], np.where(valid, rows, -1).astype(np.int32)


def _select(neg_counts: np.ndarray, rank: int) -> tuple[int, int]:
  """Bin holding the (rank+1)-th largest element, and its rank inside."""
  ge = np.cumsum(neg_counts[::-1])[::-1]  # ge[b] = #elements in bins >= b.
  b = int(np.flatnonzero(ge > rank)[-1])
  return b, rank - int(ge[b] - neg_counts[b])


def retrieval_metrics(emb: np.ndarray, ids: np.ndarray,
                      fars: Sequence[float] = (1e-3, 0.1),
                      block_rows: int | None = None,
                      prefix: str = "retrieval") -> dict[str, float]:
  """Exact all-pairs recall at fixed FAR, and recall@1 (see module doc).

  Args:
    emb: [N, D] L2-normalised embeddings.
    ids: [N] integer identities.
    fars: target false accept rates.
    block_rows: query rows per block; default keeps a block at ~2^23 scores.
    prefix: metric name prefix.

  Returns:
    {prefix/recall_at_far_{f:g}, prefix/threshold_at_far_{f:g} for f in fars,
    prefix/recall_at_1}; recalls are nan when there is nothing to count.
  """
  emb = np.asarray(emb, np.float32)
  ids = np.asarray(ids).astype(np.int32)
  n = len(emb)
  block_rows = block_rows or max(1, min(n, (1 << 23) // max(n, 1)))
  x, xids = jnp.asarray(emb), jnp.asarray(ids)
  hist = np.zeros(2 * _HALF, np.int64)
  hits = queries = 0
  for xq, idq, rowq in _blocks(emb, ids, block_rows):
    h, hit, q = _pass1(xq, idq, rowq, x, xids)
    hist += np.asarray(h, np.int64)
    hits, queries = hits + int(hit), queries + int(q)
  neg_hi, pos_hi = hist[:_HALF], hist[_HALF:]
  n_neg, n_pos = int(neg_hi.sum()), int(pos_hi.sum())
  out = {f"{prefix}/recall_at_1": hits / queries if queries else float("nan")}
  # Allowed false accepts per target; Fraction(repr) avoids 0.001*n rounding.
  allowed = [int(Fraction(repr(float(f))) * n_neg) for f in fars]
  todo = [i for i, m in enumerate(allowed) if m < n_neg]
  sel = {i: _select(neg_hi, allowed[i]) for i in todo}
  lo_hist = np.zeros((len(todo), 2 * _HALF), np.int64)
  if todo:
    hi_bins = jnp.asarray([sel[i][0] for i in todo], jnp.uint32)
    for xq, idq, rowq in _blocks(emb, ids, block_rows):
      lo_hist += np.asarray(
          _pass2(xq, idq, rowq, x, xids, hi_bins, len(todo)), np.int64)
  for i, far in enumerate(fars):
    name = f"{far:g}"
    if i not in todo:  # Every pair accepted.
      recall, thresh = 1.0, -float("inf")
    else:
      b, r = sel[i]
      row = lo_hist[todo.index(i)]
      if row[:_HALF].sum() != neg_hi[b]:  # Passes must see equal scores.
        raise RuntimeError("Similarity scores differed between passes; "
                           "the backend's matmul is not deterministic.")
      lo, _ = _select(row[:_HALF], r)
      accepted = int(pos_hi[b + 1:].sum() + row[_HALF + lo + 1:].sum())
      recall, thresh = accepted / n_pos, key_to_float((b << 16) | lo)
    out[f"{prefix}/recall_at_far_{name}"] = recall if n_pos else float("nan")
    out[f"{prefix}/threshold_at_far_{name}"] = thresh
  return out


class Retrieval:
  """Verification / retrieval metrics of an embedding model (all pairs)."""

  def __init__(self, embed_fn: Callable[[Any, jax.Array], jax.Array],
               images: np.ndarray, identities: np.ndarray,
               fars: Sequence[float] = (1e-3, 0.1), batch_size: int = 256,
               block_rows: int | None = None, prefix: str = "retrieval"):
    """Initialises the evaluator.

    Args:
      embed_fn: (params, images[B, H, W, C]) -> [B, D] embeddings (need not
        be normalised).
      images: [N, H, W, C] held-out images (open set: unseen identities).
      identities: int[N] identity of each image.
      fars: target false accept rates.
      batch_size: images per embed_fn call.
      block_rows: similarity rows per block (default: ~2^23 scores a block).
      prefix: metric name prefix.
    """
    self.embed_fn, self.images = embed_fn, images
    self.identities = np.asarray(identities)
    self.fars, self.batch_size = tuple(fars), batch_size
    self.block_rows, self.prefix = block_rows, prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns recall_at_far_{f}, threshold_at_far_{f} and recall_at_1."""
    emb = embeddings(self.embed_fn, params, self.images, self.batch_size)
    return retrieval_metrics(emb, self.identities, self.fars,
                             self.block_rows, self.prefix)
