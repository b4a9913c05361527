"""Tests for dpjax.data.synthetic."""

import numpy as np
import pytest

from dpjax.data import synthetic


def _centroid(img, rgb):
  ys, xs = np.nonzero(np.all(img == np.asarray(rgb, np.uint8), axis=-1))
  assert ys.size > 0, "object colour not visible"
  return xs.mean(), ys.mean()


@pytest.mark.parametrize("cls,args", [
    (synthetic.ShapesCaptions, (50,)), (synthetic.Textures, (50,)),
    (synthetic.Identities, (5, 10)), (synthetic.Classes, (50,))])
def test_deterministic_and_split_dependent(cls, args):
  a, b = cls(*args, seed=3), cls(*args, seed=3)
  c = cls(*args, seed=3, split="test")
  for i in (0, 7, 49):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["image"].shape == (32, 32, 3)
    assert a[i]["image"].dtype == np.uint8
  same = sum(np.array_equal(a[i]["image"], c[i]["image"]) for i in range(50))
  assert same <= 2
  other_seed = cls(*args, seed=4)
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])


def test_huge_index_is_cheap():
  ds = synthetic.ShapesCaptions(2_000_000_000, image_size=16)
  assert ds[1_999_999_999]["image"].shape == (16, 16, 3)
  with pytest.raises(IndexError):
    ds[2_000_000_000]  # pylint: disable=pointless-statement


def test_captions_match_image_and_labels():
  ds = synthetic.ShapesCaptions(300, seed=1)
  n_two = 0
  for i in range(300):
    r = ds[i]
    words = r["caption"].split()
    assert r["label"] == r["shape"] * len(synthetic.COLORS) + r["color"]
    assert words[1:4] == [synthetic.SIZES[r["size"]],
                          synthetic.COLORS[r["color"]],
                          synthetic.SHAPES[r["shape"]]]
    assert set(words) <= set(synthetic.VOCAB_WORDS)
    p1 = _centroid(r["image"], synthetic.COLOR_RGB[r["color"]])
    if r["num_shapes"] == 1:
      assert r["relation"] == -1
      continue
    n_two += 1
    assert r["color"] != r["color2"]
    rel = synthetic.RELATIONS[r["relation"]]
    assert rel in r["caption"]
    p2 = _centroid(r["image"], synthetic.COLOR_RGB[r["color2"]])
    dx, dy = p1[0] - p2[0], p1[1] - p2[1]
    if rel == "left of":
      assert dx < 0 and abs(dx) > abs(dy)
    elif rel == "right of":
      assert dx > 0 and abs(dx) > abs(dy)
    elif rel == "above":
      assert dy < 0 and abs(dy) > abs(dx)
    else:
      assert dy > 0 and abs(dy) > abs(dx)
    # The subject sits in the half its relation names, near the middle of
    # the other axis: its position alone decides the relation word.
    along, across = (0, 1) if rel in ("left of", "right of") else (1, 0)
    low = rel in ("left of", "above")
    assert (p1[along] < 16) == low
    assert abs(p1[across] - 16) < 0.2 * 32 and abs(p2[across] - 16) < 0.2 * 32
  assert 100 < n_two < 200


def test_perturbed_captions_differ_and_prompts():
  ds = synthetic.ShapesCaptions(100, seed=2)
  kinds = set()
  for i in range(100):
    r = ds[i]
    pert = synthetic.perturbed_captions(r)
    assert pert and r["caption"] not in pert.values()
    kinds |= set(pert)
  assert {"swap_color", "swap_order", "swap_relation",
          "wrong_shape"} <= kinds
  prompts = synthetic.zero_shot_prompts()
  assert prompts[0] == "this is a photo of a circle"
  assert len(prompts) == len(synthetic.SHAPES)


def test_classes_single_object():
  ds = synthetic.Classes(100)
  labels = {ds[i]["label"] for i in range(100)}
  assert all(ds[i]["num_shapes"] == 1 for i in range(100))
  assert len(labels) > 20 and max(labels) < ds.num_classes == 30


def test_identities_layout():
  ds = synthetic.Identities(7, 5, seed=0)
  assert len(ds) == 35 and ds.num_users == 7
  idx = ds.user_indices(3)
  np.testing.assert_array_equal(idx, np.arange(15, 20))
  assert all(ds[int(i)]["user"] == ds[int(i)]["identity"] == 3 for i in idx)
  # Images of one identity resemble each other more than other identities.
  imgs = np.stack([ds[i]["image"] for i in range(35)]).astype(np.float32)
  d = ((imgs[:, None] - imgs[None]) ** 2).mean(axis=(2, 3, 4))
  ident = np.repeat(np.arange(7), 5)
  same = ident[:, None] == ident[None]
  off = ~np.eye(35, dtype=bool)
  assert d[same & off].mean() < d[~same].mean()
  held_out = synthetic.Identities(7, 5, first_identity=7)
  assert not np.array_equal(held_out.prototype(0), ds.prototype(0))
