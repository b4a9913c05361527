"""Tests for dpjax.evaluate.retrieval: exact all-pairs metrics vs numpy."""

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.evaluate import retrieval


def _brute_force(emb, ids, fars):
  """All-pairs metrics in float64 numpy, straight from the definitions."""
  emb = np.asarray(emb, np.float64)
  n = len(emb)
  sim = 1.0 - ((emb[:, None] - emb[None]) ** 2).sum(-1) / 4.0
  iu = np.triu_indices(n, k=1)
  s, same = sim[iu], (ids[:, None] == ids[None])[iu]
  neg = np.sort(s[~same])[::-1]
  pos = s[same]
  out = {}
  for far in fars:
    m = int(Fraction(repr(far)) * len(neg))
    t = neg[m] if m < len(neg) else -np.inf
    assert np.sum(neg > t) <= far * len(neg)
    out[f"retrieval/recall_at_far_{far:g}"] = np.mean(pos > t)
    out[f"retrieval/threshold_at_far_{far:g}"] = t
  nn_sim = np.where(np.eye(n, dtype=bool), -np.inf, sim)
  has = ((ids[:, None] == ids[None]) & ~np.eye(n, dtype=bool)).any(1)
  hit = ids[np.argmax(nn_sim, 1)] == ids
  out["retrieval/recall_at_1"] = np.mean(hit[has])
  return out


def _clustered(n, n_ids, d, noise, seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, n_ids, n)
  emb = rng.normal(size=(n_ids, d))[ids] + noise * rng.normal(size=(n, d))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return emb.astype(np.float32), ids


@pytest.mark.parametrize("block_rows", [None, 7, 64])
def test_matches_brute_force(block_rows):
  emb, ids = _clustered(400, 60, 16, 0.8, seed=0)
  fars = (1e-3, 0.01, 0.1)
  got = retrieval.retrieval_metrics(emb, ids, fars, block_rows=block_rows)
  want = _brute_force(emb, ids, fars)
  assert set(got) == set(want)
  for k, v in want.items():
    if "threshold" in k:
      assert got[k] == pytest.approx(v, abs=1e-6), k
    else:
      assert got[k] == v, k  # Exact counts.
  # Informative embeddings: far above the FAR, and sensible ordering.
  assert got["retrieval/recall_at_far_0.001"] > 0.2
  assert (got["retrieval/recall_at_far_0.1"]
          >= got["retrieval/recall_at_far_0.01"]
          >= got["retrieval/recall_at_far_0.001"])


def test_exact_with_ties():
  # Embeddings drawn from 4 orthonormal vectors: similarities are exactly
  # 1.0 or 0.5 in float32 and float64, so ties dominate.
  rng = np.random.default_rng(1)
  n = 120
  ids = rng.integers(0, 10, n)
  emb = np.eye(4, dtype=np.float32)[(ids + rng.integers(0, 2, n)) % 4]
  fars = (1e-3, 0.1, 0.5, 1.0)
  got = retrieval.retrieval_metrics(emb, ids, fars, block_rows=16)
  want = _brute_force(emb, ids, fars)
  for k, v in want.items():
    if k != "retrieval/recall_at_1":  # argmax tie-break is arbitrary.
      assert got[k] == v, k
  assert got["retrieval/recall_at_far_1"] == 1.0
  assert got["retrieval/threshold_at_far_1"] == -np.inf


def test_random_embeddings_recall_near_far():
  emb, ids = _clustered(600, 100, 32, 1e6, seed=2)  # Noise only.
  got = retrieval.retrieval_metrics(emb, ids, (0.1,))
  assert abs(got["retrieval/recall_at_far_0.1"] - 0.1) < 0.06
  assert got["retrieval/recall_at_1"] < 0.1


def test_key_order_roundtrip():
  vals = np.array([-2.0, -1e-30, -0.0, 0.0, 1e-30, 0.25, 0.5, 1.0, 3.0],
                  np.float32)
  keys = np.asarray(retrieval.float_to_key(jnp.asarray(vals))).astype(np.int64)
  assert np.all(np.diff(keys) >= 0)
  assert keys[2] == keys[3]  # -0.0 == +0.0.
  for v, k in zip(vals, keys):
    assert retrieval.key_to_float(int(k)) == v


def test_evaluator_normalises_and_runs():
  emb, ids = _clustered(200, 30, 8, 0.5, seed=3)
  images = (emb * 7.0).reshape(200, 2, 2, 2)  # Unnormalised "images".
  embed_fn = lambda params, x: x.reshape(x.shape[0], -1) * params
  ev = retrieval.Retrieval(embed_fn, images, ids, batch_size=64)
  got = ev.run(jnp.float32(2.0))
  want = _brute_force(emb, ids, (1e-3, 0.1))
  for k in ("retrieval/recall_at_far_0.1", "retrieval/recall_at_1"):
    assert got[k] == want[k]
