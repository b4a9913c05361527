"""Tests for python -m dpjax.prepare (tiny inputs made at test time)."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

from dpjax.data import sources
from dpjax.data import transforms
from dpjax.data import users as users_lib
from dpjax.prepare import dedup
from dpjax.prepare import readers
from dpjax.prepare import run
from dpjax.prepare import stage
from tests.prepare import fake_inputs


def _run(input_spec, fmt, out, dedup_mode="exact", **opts):
  return run.prepare(str(input_spec), fmt, str(out),
                     stage.Options(**opts), dedup_mode=dedup_mode,
                     records_per_shard=2)


def test_webdataset_drops_and_global_exact_dedup(tmp_path):
  png = [fake_inputs.encode(fake_inputs.pixels(i)) for i in range(4)]
  meta = lambda i: json.dumps({"url": f"u{i}"}).encode()
  fake_inputs.tar(tmp_path / "00000.tar", [
      (f"{i:05d}", {"png": png[i], "txt": f"cap {i}".encode(),
                    "json": meta(i)}) for i in range(3)] + [
      ("00003", {"png": b"not an image", "txt": b"corrupt"}),
      ("00004", {"png": png[3]})])  # No caption.
  # Second shard: a byte-identical copy of 0 and a re-encoding of 1 with
  # other bytes but the same pixels (exact dedup hashes pixels).
  again = fake_inputs.encode(fake_inputs.pixels(1), optimize=True, compress_level=1)
  assert again != png[1]
  fake_inputs.tar(tmp_path / "00001.tar", [
      ("10000", {"png": png[0], "txt": b"copy"}),
      ("10001", {"png": again, "txt": b"re-encoded"}),
      ("10002", {"png": png[3], "txt": b"cap 3"})])
  # Third shard: cut short inside its second sample (a failed download).
  fake_inputs.tar(tmp_path / "00002.tar", [(f"2000{i}", {"png": fake_inputs.encode(fake_inputs.pixels(9 + i)),
                                               "txt": b"late"})
                                for i in range(2)])
  with tarfile.open(tmp_path / "00002.tar") as tar:
    cut = tar.getmember("20001.png").offset_data + 10
  os.truncate(tmp_path / "00002.tar", cut)
  m = _run(tmp_path, "webdataset", tmp_path / "out")
  assert m["num_examples"] == 5 and m["source"]["records_read"] == 10
  assert m["dropped"] == {"corrupt_image": 1, "exact_duplicate": 2,
                          "missing_caption": 1, "unreadable_input": 1}
  src = sources.make_source(f"arrayrecord:{tmp_path / 'out'}")
  # Dense indices over the kept records, in input order.
  assert [src[i]["caption"] for i in range(len(src))] == [
      "cap 0", "cap 1", "cap 2", "cap 3", "late"]
  assert sorted(src[0]) == sorted(m["fields"]) == ["caption", "image", "key"]
  assert transforms.decode_image(src[0]["image"]).shape == (24, 32, 3)
  with open(tmp_path / "out" / "dropped.jsonl") as f:
    dups = [d for d in map(json.loads, f) if "kept_index" in d]
  assert [(d["key"], d["kept_index"]) for d in dups] == [("10000", 0),
                                                         ("10001", 1)]


def test_manifest_num_examples_mismatch_names_both(tmp_path):
  fake_inputs.folder(tmp_path / "in", [{"file": "a.png", "caption": "a"}],
          {"a.png": fake_inputs.encode(fake_inputs.pixels(0))})
  _run(tmp_path / "in", "folder", tmp_path / "out")
  spec = f"arrayrecord:{tmp_path / 'out'}"
  assert len(sources.make_source(spec, expect_num_examples=1)) == 1
  with pytest.raises(ValueError, match=r"config.data.num_examples=233804767"
                     r" but .*manifest.json says num_examples=1.*Fix: set "
                     r"config.data.num_examples=1"):
    sources.make_source(spec, expect_num_examples=233_804_767,
                        num_examples_field="config.data.num_examples")


def test_folder_and_parquet_round_trip_with_resize(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  imgs = {f"{i}.png": fake_inputs.encode(fake_inputs.pixels(i, (40, 60))) for i in range(3)}
  fake_inputs.folder(tmp_path / "f", [{"file": f"{i}.png", "caption": f"c{i}",
                            "label": i} for i in range(3)] +
          [{"file": "gone.png", "caption": "missing file"}], imgs)
  pq.write_table(pa.table({
      "jpg": [{"bytes": imgs[f"{i}.png"], "path": None} for i in range(3)],
      "caption": ["c0", "c1", None], "key": ["k0", "k1", "k2"]}),
                 tmp_path / "p.parquet")
  for fmt, spec, n, drop in (("folder", tmp_path / "f", 3, "missing_image"),
                             ("parquet", tmp_path, 2, "missing_caption")):
    m = _run(spec, fmt, tmp_path / fmt, image_size=20, jpeg_quality=80,
             label_key="label" if fmt == "folder" else "")
    assert m["num_examples"] == n and m["dropped"] == {drop: 1}
    assert m["image"]["shorter_side"] == 20
    src = sources.make_source(f"arrayrecord:{tmp_path / fmt}")
    rec = src[1]
    assert rec["caption"] == "c1" and rec["image"][:2] == b"\xff\xd8"
    assert transforms.decode_image(rec["image"]).shape == (20, 30, 3)
    assert rec.get("label", 1) == 1


def test_near_dedup_drops_altered_copy_keeps_different(tmp_path):
  base = fake_inputs.pixels(0, (48, 48))
  altered = np.clip(base.astype(int) + 6, 0, 255).astype(np.uint8)
  imgs = {"a.png": fake_inputs.encode(base), "b.jpg": fake_inputs.encode(altered, "JPEG",
                                                   quality=85),
          "c.png": fake_inputs.encode(fake_inputs.pixels(5, (48, 48)))}
  assert dedup.hamming(dedup.dhash(Image.fromarray(base)),
                       dedup.dhash(Image.open(io.BytesIO(imgs["b.jpg"])))
                       ) <= 4
  fake_inputs.folder(tmp_path / "in", [{"file": k, "caption": k} for k in imgs], imgs)
  exact = _run(tmp_path / "in", "folder", tmp_path / "exact")
  assert exact["num_examples"] == 3
  near = _run(tmp_path / "in", "folder", tmp_path / "near", "near")
  assert near["num_examples"] == 2 and near["dropped"] == {
      "near_duplicate": 1}
  src = sources.make_source(f"arrayrecord:{tmp_path / 'near'}")
  assert [src[i]["caption"] for i in range(2)] == ["a.png", "c.png"]


def test_resume_skips_done_shards(tmp_path, monkeypatch):
  imgs = {f"{i}.png": fake_inputs.encode(fake_inputs.pixels(i)) for i in range(5)}
  fake_inputs.folder(tmp_path / "in", [{"file": k, "caption": k} for k in imgs], imgs)
  out = tmp_path / "out"
  real_write, real_read = stage.write_shard, readers.read_shard

  def fail_on_last(shard, **kw):
    if shard.file.startswith("data-00002"):
      raise KeyboardInterrupt  # The job dies while writing.
    return real_write(shard, **kw)
  monkeypatch.setattr(stage, "write_shard", fail_on_last)
  with pytest.raises(KeyboardInterrupt):
    _run(tmp_path / "in", "folder", out)
  first = out / "data-00000-of-00003.arrayrecord"
  stamp = os.stat(first).st_mtime_ns
  reads = []
  monkeypatch.setattr(stage, "write_shard", real_write)
  monkeypatch.setattr(readers, "read_shard",
                      lambda *a: reads.append(a) or real_read(*a))
  m = _run(tmp_path / "in", "folder", out)
  assert reads == [] and os.stat(first).st_mtime_ns == stamp
  assert m["num_examples"] == 5 and not os.path.exists(out / "_work")
  assert _run(tmp_path / "in", "folder", out) == m  # Done: nothing to do.


def test_user_keyed_ranges_match_a_scan(tmp_path, monkeypatch):
  writers = ["w2", "w1", "w2", "w3", "w1", "w2", "w1"]
  imgs = {f"{i}.png": fake_inputs.encode(fake_inputs.pixels(i)) for i in range(len(writers))}
  rows = [{"file": f"{i}.png", "writer_id": w, "label": i % 3}
          for i, w in enumerate(writers)]
  fake_inputs.folder(tmp_path / "in", rows, imgs)
  out = tmp_path / "out"
  m = _run(tmp_path / "in", "folder", out, caption_key="",
           user_key="writer_id", label_key="label")
  assert m["users"]["num_users"] == 3 and m["users"]["field"] == "user"
  with open(out / "users.jsonl") as f:
    ranges = [json.loads(line) for line in f]
  assert ranges == [["w1", 0, 3], ["w2", 3, 6], ["w3", 6, 7]]
  fields = {"user": "user", "label": "label"}
  src = sources.make_source(f"arrayrecord:{out}", fields=fields)
  assert [src[i]["user"] for i in range(7)] == sorted(writers)
  kw = dict(label_range=(0, 2), keep_user=lambda u: u != "w3")
  scanned = users_lib.UserKeyedSource(  # A glob: no manifest, a scan.
      sources.make_source(f"arrayrecord:{out}/*.arrayrecord",
                          fields=fields), "user", "label", **kw)
  monkeypatch.setattr(users_lib, "_scan", None)  # Must not scan.
  ranged = users_lib.UserKeyedSource(src, "user", "label", **kw)
  assert ranged.num_users == scanned.num_users == 2
  for u in range(2):
    assert ranged.user_id(u) == scanned.user_id(u)
    np.testing.assert_array_equal(ranged.user_indices(u),
                                  scanned.user_indices(u))
  np.testing.assert_array_equal(ranged.user_keys, scanned.user_keys)


def _two_tars(path):
  os.makedirs(path, exist_ok=True)
  for s in range(2):
    fake_inputs.tar(path / f"{s:05d}.tar", [
        (f"{s}{i:04d}", {"png": fake_inputs.encode(fake_inputs.pixels(i + 2 * s)),
                         "txt": f"cap {s} {i}".encode()}) for i in range(3)])
  return path


def _records(out):
  src = sources.make_source(f"arrayrecord:{out}")
  return [src[i] for i in range(len(src))]


def test_cli_with_worker_processes(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  _two_tars(tmp_path / "in")
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "dpjax.prepare",
                  f"--input={tmp_path / 'in'}/*.tar", "--format=webdataset",
                  f"--output={out}", "--num_workers=2",
                  "--records_per_shard=2"], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                     os.path.abspath(__file__)))))
  with open(out / "manifest.json") as f:
    m = json.load(f)
  assert m["command"].startswith("python -m dpjax.prepare '--input=")
  assert m["num_examples"] == 5 and m["dropped"] == {"exact_duplicate": 1}
  assert [r["caption"] for r in _records(out)] == [
      "cap 0 0", "cap 0 1", "cap 0 2", "cap 1 1", "cap 1 2"]


def test_beam_direct_runner_matches_local(tmp_path):
  # apache-beam: the [beam] extra, also in [test].
  _two_tars(tmp_path / "in")
  local = _run(tmp_path / "in", "webdataset", tmp_path / "local")
  beam = run.prepare(str(tmp_path / "in"), "webdataset",
                     str(tmp_path / "beam"), stage.Options(),
                     runner="beam", num_workers=2, records_per_shard=2)
  assert beam["shards"] == local["shards"]
  assert _records(tmp_path / "beam") == _records(tmp_path / "local")
