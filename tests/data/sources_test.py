"""Tests for dpjax.data.sources (fixtures under tests/fixtures/)."""

import os

import numpy as np
import pytest

from dpjax.data import pipeline
from dpjax.data import records as records_lib
from dpjax.data import sources
from dpjax.data import synthetic
from dpjax.data import tokenizer
from dpjax.data import transforms

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TFDS_DIR = os.path.join(FIXTURES, "tfds")


def _check_caption_records(src, n):
  assert len(src) == n
  for i in range(n):
    r = src[i]
    assert isinstance(r["caption"], str) and r["caption"].startswith("a ")
    img = transforms.decode_image(r["image"])
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert 0 <= int(r["label"]) < 30


def test_tfds_fixture_without_tensorflow():
  src = sources.make_source("tfds:dpjax_tiny_captions", split="train",
                            data_dir=TFDS_DIR)
  _check_caption_records(src, 6)
  test = sources.make_source("tfds:dpjax_tiny_captions:1.0.0", split="test",
                             data_dir=TFDS_DIR, fields={"text": "caption"})
  assert len(test) == 2 and isinstance(test[0]["text"], str)
  assert "caption" not in test[0]


def test_tfds_missing_dataset_error_names_field_value_fix(tmp_path):
  with pytest.raises(ValueError) as e:
    sources.make_source("tfds:laion400m", split="train",
                        data_dir=str(tmp_path))
  msg = str(e.value)
  assert "data.source='tfds:laion400m'" in msg
  assert str(tmp_path) in msg
  assert "tfds build laion400m" in msg and "tiny" in msg


def test_folder_and_arrayrecord_fixtures():
  folder = sources.make_source(f"folder:{FIXTURES}/folder")
  _check_caption_records(folder, 4)
  assert folder[0]["file"] == "img0.png"
  ar = sources.make_source(f"arrayrecord:{FIXTURES}/arrayrecord/*")
  _check_caption_records(ar, 4)
  # Same generator, same split name as make_fixtures -> same captions.
  expected = synthetic.ShapesCaptions(4, image_size=16, seed=123,
                                      split="arrayrecord")
  assert [ar[i]["caption"] for i in range(4)] == [
      expected[i]["caption"] for i in range(4)]
  np.testing.assert_array_equal(transforms.decode_image(ar[1]["image"]),
                                expected[1]["image"])


def test_write_arrayrecord_round_trip(tmp_path):
  path = str(tmp_path / "x.array_record")
  img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  records_lib.write_arrayrecord(path, [{"image": img, "caption": "hi",
                                    "label": np.int64(2), "w": 0.5}])
  src = sources.make_source(f"arrayrecord:{path}", fields={"y": "label"})
  r = src[0]
  np.testing.assert_array_equal(transforms.decode_image(r["image"]), img)
  assert (r["caption"], r["y"], r["w"]) == ("hi", 2, 0.5)


def test_bad_specs():
  with pytest.raises(ValueError, match="synthetic:shapes"):
    sources.make_source("synthetic:nope")
  with pytest.raises(FileNotFoundError, match="no files match"):
    sources.make_source("arrayrecord:/nonexistent/*.ar")
  with pytest.raises(FileNotFoundError, match="captions.jsonl"):
    sources.make_source(f"folder:{TFDS_DIR}")
  with pytest.raises(ValueError, match="unknown kind"):
    sources.make_source("hf:coco")
  src = sources.make_source("synthetic:identities", num_identities=3,
                            images_per_identity=2, image_size=8)
  assert len(src) == 6 and src.num_users == 3


@pytest.mark.parametrize("spec,kw", [
    ("tfds:dpjax_tiny_captions", {"data_dir": TFDS_DIR}),
    (f"folder:{FIXTURES}/folder", {}),
    (f"arrayrecord:{FIXTURES}/arrayrecord/*", {})])
def test_fixtures_through_pipeline(spec, kw):
  src = sources.make_source(spec, split="train", **kw)
  ts = transforms.image_pipeline(
      8, augment=True, tokenizer=tokenizer.shapes_tokenizer(), max_len=12,
      keep=("image", "label"))
  it = pipeline.poisson_batches(src, sampling_rate=0.5, global_microbatch=4,
                                seed=0, num_steps=3, transforms=ts,
                                process_index=0, process_count=1)
  for e in it:
    b = e["example"]
    assert b["image"].shape[1:] == (4, 8, 8, 3)
    assert b["image"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    assert b["tokens"].shape[1:] == (4, 12)
    assert e["mask"].sum() == e["batch_size"]
  rows = [transforms.apply(ts[:1] + [transforms.Resize(8),
                                     transforms.Keep(["label"])],
                           dict(src[i]), np.random.default_rng(i))
          for i in range(len(src))]
  assert all(set(r) == {"label"} for r in rows)
