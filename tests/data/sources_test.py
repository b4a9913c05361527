"""Tests for dpjax.data.sources (fixtures under tests/fixtures/)."""

import os

import numpy as np
import pytest

from dpjax.data import manifest as manifest_lib
from dpjax.data import pipeline
from dpjax.data import sources
from dpjax.data import splits
from dpjax.data import synthetic
from dpjax.data import tokenizer
from dpjax.data import transforms
from dpjax.prepare import records as records_lib

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
  # Same generator, same split name as tools/make_fixtures.py -> same captions.
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


# --- record_keys: the split's keys, read without decoding images ----------


def _fixture_records(n):
  """n distinct msgpack records from the ArrayRecord fixture: the first half
  with a "key" field (as prepared records carry), the rest without."""
  ar = sources.make_source(f"arrayrecord:{FIXTURES}/arrayrecord/*")
  out = []
  for i in range(n):
    r = dict(ar[i % len(ar)], caption=f"a record {i}")
    if i < n // 2:
      r["key"] = f"{i:08d}"
    out.append(records_lib.pack_record(r))
  return out


def _write(tmp_path, name, payloads):
  path = str(tmp_path / name)
  records_lib.write_packed(path, payloads)
  return path


def _prepared_dir(tmp_path, payloads):
  """A directory read through a manifest (the ``prepare`` layout)."""
  d = tmp_path / "prepared"
  d.mkdir()
  _write(d, "data-00000-of-00001.arrayrecord", payloads)
  manifest_lib.write(str(d), {"num_examples": len(payloads), "shards": [
      {"file": "data-00000-of-00001.arrayrecord",
       "num_examples": len(payloads)}]})
  return str(d)


def _tfds(fields=None, **kw):
  return sources.tfds_source("dpjax_tiny_captions", split="train",
                             data_dir=TFDS_DIR, fields=fields, **kw)


@pytest.fixture
def no_image_decode(monkeypatch):
  """Makes every image decoder fail the test if called."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    raise AssertionError("an image was decoded")

  monkeypatch.setattr(Image, "open", fail)
  monkeypatch.setattr(tfds.features.Image, "decode_example_np", fail)
  monkeypatch.setattr(transforms, "decode_image", fail)


def _keys(src):
  keys, readable = src.record_keys()
  assert keys.dtype == np.uint64 and keys.shape == readable.shape == (
      len(src),)
  return keys, readable


@pytest.mark.parametrize("make", [
    lambda tmp: sources.make_source(f"arrayrecord:{FIXTURES}/arrayrecord/*"),
    lambda tmp: sources.make_source(f"folder:{FIXTURES}/folder"),
    lambda tmp: sources.make_source(
        f"arrayrecord:{_prepared_dir(tmp, _fixture_records(40))}",
        fields={"caption": "caption"}),
    lambda tmp: _tfds(fields={"key": "caption"}),  # A TFDS key field.
], ids=["arrayrecord", "folder", "prepared", "tfds_key_field"])
def test_record_keys_are_the_records_keys(make, tmp_path):
  src = make(tmp_path)
  expected = np.array([splits.record_key(src[i]) for i in range(len(src))],
                      np.uint64)
  keys, readable = _keys(src)
  assert readable.all()
  np.testing.assert_array_equal(keys, expected)
  assert len(set(keys.tolist())) == len(src)


def test_tfds_keys_hash_the_record_with_its_image_encoded():
  """Without a key field: record_key of the record as tfds returns it with
  image decoding skipped (tfds's own API), not of the decoded pixels."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  src = _tfds()
  encoded = _tfds()
  encoded.source.decoders = {"image": tfds.decode.SkipDecoding()}
  assert isinstance(encoded[0]["image"], bytes)
  keys, readable = _keys(src)
  assert readable.all() and len(set(keys.tolist())) == len(src)
  np.testing.assert_array_equal(keys, [splits.record_key(encoded[i])
                                       for i in range(len(src))])
  # A source opened with its own decoders is keyed through ds[i].
  np.testing.assert_array_equal(_keys(encoded)[0], keys)


def test_record_keys_decode_no_image(no_image_decode, tmp_path):
  prepared = _prepared_dir(tmp_path, _fixture_records(8))
  for src in (sources.make_source(f"arrayrecord:{FIXTURES}/arrayrecord/*"),
              sources.make_source(f"folder:{FIXTURES}/folder"),
              sources.make_source(f"arrayrecord:{prepared}"),
              _tfds(), _tfds(fields={"key": "caption"})):
    keys, readable = _keys(src)
    assert readable.all() and len(set(keys.tolist())) == len(src)
    pub, priv = splits.public_private_split(src, 0.5, 3)
    assert len(pub) + len(priv) == len(src)
  with pytest.raises(AssertionError, match="decoded"):
    _tfds()[0]  # The patch does catch tfds's decoder.


class _NoKeys:
  """``source`` without ``record_keys``: the split reads ``source[i]``."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


def test_split_through_record_keys_equals_split_through_records(tmp_path):
  """Same shares either way, unreadable records private in both."""
  payloads = _fixture_records(300)
  for i in (5, 200):
    payloads[i] = b"\xc1 not msgpack"
  src = sources.make_source(
      f"arrayrecord:{_write(tmp_path, 'a.ar', payloads)}")
  keys, readable = _keys(src)
  assert readable.tolist() == [i not in (5, 200) for i in range(300)]
  for seed in range(3):
    fast = splits.public_private_split(src, 0.3, seed)
    slow = splits.public_private_split(_NoKeys(src), 0.3, seed)
    for a, b in zip(fast, slow):
      np.testing.assert_array_equal(a.source_indices(), b.source_indices())
    assert {5, 200} <= set(fast[1].source_indices().tolist())


def test_a_record_keeps_its_key_wherever_it_sits(tmp_path):
  """Adjacency: reordered, with one record inserted first and one removed,
  every other record keeps its key (so its share)."""
  payloads = _fixture_records(60)
  new = records_lib.pack_record({"image": b"x", "caption": "new"})
  moved = [new] + payloads[::-1][:-1]  # payloads[0] removed.
  a = _keys(sources.make_source(
      f"arrayrecord:{_write(tmp_path, 'a.ar', payloads)}"))[0]
  b = _keys(sources.make_source(
      f"arrayrecord:{_write(tmp_path, 'b.ar', moved)}"))[0]
  np.testing.assert_array_equal(b[1:], a[::-1][:-1])
  assert b[0] not in set(a.tolist())


def test_tfds_record_keeps_its_key_wherever_it_sits(tmp_path):
  from array_record.python import array_record_data_source as ards  # pylint: disable=g-import-not-at-top
  src = _tfds()
  raw = src.source.data_source.__getitems__(list(range(len(src))))
  keys = _keys(src)[0]
  moved = _tfds()
  moved.source.data_source = ards.ArrayRecordDataSource(
      [_write(tmp_path, "t.ar", raw[:0:-1])])  # Reversed, record 0 removed.
  np.testing.assert_array_equal(_keys(moved)[0], keys[:0:-1])
