"""Public/private splits: disjoint, complete, deterministic views."""

import math

import numpy as np
import pytest

from dpjax.data import pipeline
from dpjax.data import splits
from dpjax.data import synthetic
from dpjax.data import transforms


class _Ids:
  """A source whose record i is {"id": i}."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return {"id": np.int64(i)}


@pytest.mark.parametrize("n,fraction,seed", [
    (1000, 0.1, 0), (997, 0.1, 3), (1024, 0.25, 7), (3, 0.34, 1),
    (30_000, 0.1, 12)])
def test_split_is_disjoint_and_complete(n, fraction, seed):
  pub, priv = splits.public_private_split(_Ids(n), fraction, seed)
  a, b = pub.source_indices(), priv.source_indices()
  assert len(pub) == round(fraction * n) and len(pub) + len(priv) == n
  assert not set(a.tolist()) & set(b.tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(n))
  assert [priv[i]["id"] for i in range(len(priv))] == b.tolist()


def test_split_is_deterministic_and_seeded():
  s = lambda seed: splits.public_private_split(_Ids(5000), 0.1, seed)
  np.testing.assert_array_equal(s(0)[0].source_indices(),
                                s(0)[0].source_indices())
  assert set(s(0)[0].source_indices()) != set(s(1)[0].source_indices())


def test_public_share_is_spread_over_the_index_range():
  pub, _ = splits.public_private_split(_Ids(10_000), 0.1, 0)
  counts = np.bincount(pub.source_indices() // 1000, minlength=10)
  assert counts.min() >= 80 and counts.max() <= 120  # 100 expected per bin.


def test_view_rejects_out_of_range_indices():
  pub, priv = splits.public_private_split(_Ids(100), 0.1, 0)
  for view in (pub, priv):
    with pytest.raises(IndexError):
      view[len(view)]
    with pytest.raises(IndexError):
      view[-1]


def test_private_poisson_batches_never_yield_a_public_example():
  """The DP pipeline over the private view samples private records only."""
  src = synthetic.Classes(num_examples=400, image_size=8, seed=0)
  pub, priv = splits.public_private_split(src, 0.1, 0)
  public_images = {pub[i]["image"].tobytes() for i in range(len(pub))}
  batches = iter(pipeline.PoissonBatches(
      priv, [transforms.Keep(["image"])], sampling_rate=0.5,
      num_examples=len(priv), seed=0,
      start_step=0, num_steps=4, global_microbatch=64))
  seen = 0
  for _ in range(4):
    el = next(batches)
    imgs = el["example"]["image"].reshape(-1, 8, 8, 3)
    for img, real in zip(imgs, el["mask"].reshape(-1)):
      if real:
        seen += 1
        assert img.tobytes() not in public_images
  assert seen > 300


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.0001])
def test_invalid_fractions_are_rejected(fraction):
  with pytest.raises(ValueError):
    splits.public_private_split(_Ids(100), fraction, 0)


def test_affine_permutation_is_a_bijection():
  for n in (1, 2, 6, 30, 64, 97, 210):
    a, b = splits.affine_permutation(n, 5)
    assert math.gcd(a, n) == 1 or n == 1
    assert sorted((a * np.arange(n) + b) % n) == list(range(n))


def test_appended_records_follow_the_source_and_nothing_else():
  view = splits.Appended(["a", "b", "c"], ["x", "y"])
  assert len(view) == 5
  assert [view[i] for i in range(5)] == ["a", "b", "c", "x", "y"]
  for bad in (-1, 5):
    with pytest.raises(IndexError):
      view[bad]
