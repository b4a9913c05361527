"""Tests for dpjax.data.transforms."""

import numpy as np

from dpjax.data import tokenizer
from dpjax.data import transforms
from dpjax.prepare import records as records_lib


def _img():
  return np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8)


def test_decode_bytes_gray_and_rgba():
  img = _img()
  np.testing.assert_array_equal(
      transforms.decode_image(records_lib.encode_image(img)), img)
  assert transforms.decode_image(img[..., 0]).shape == (20, 24, 3)
  rgba = np.concatenate([img, img[..., :1]], -1)
  np.testing.assert_array_equal(transforms.decode_image(rgba), img)


def test_random_transforms_deterministic_per_example():
  crop = transforms.RandomResizedCrop(8)
  rec = {"image": _img()}
  outs = [crop.random_map(rec, transforms.example_generator(1, s, i))["image"]
          for s, i in [(0, 5), (0, 5), (0, 6), (1, 5)]]
  assert outs[0].shape == (8, 8, 3)
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])
  assert not np.array_equal(outs[0], outs[3])
  flip = transforms.RandomFlip(p=1.0)
  np.testing.assert_array_equal(
      flip.random_map(rec, np.random.default_rng(0))["image"],
      rec["image"][:, ::-1])


def test_example_keys():
  k = transforms.example_keys(0, 3, np.arange(1000))
  assert k.shape == (1000, 2) and k.dtype == np.uint32
  assert len({tuple(r) for r in k}) == 1000
  np.testing.assert_array_equal(k[7], transforms.example_keys(0, 3, [7])[0])
  assert not np.array_equal(k, transforms.example_keys(0, 4, np.arange(1000)))


def test_image_pipeline_output():
  tok = tokenizer.ByteTokenizer()
  ts = transforms.image_pipeline(16, augment=True, tokenizer=tok, max_len=10,
                                 keep=("image",))
  rec = {"image": records_lib.encode_image(_img()), "caption": b"a red circle",
         "file": "x.png"}
  out = transforms.apply(ts, rec, transforms.example_generator(0, 0, 0))
  assert sorted(out) == ["image", "tokens"]
  assert out["image"].dtype == np.float32 and out["image"].shape == (16, 16, 3)
  assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
  assert tok.decode_fixed(out["tokens"]) == "a red ci"  # 10 - bos - eos
  mean_std = transforms.Normalize(mean=[0.5] * 3, std=[0.25] * 3).map(
      {"image": np.full((2, 2, 3), 255, np.uint8)})
  np.testing.assert_allclose(mean_std["image"], 2.0)
