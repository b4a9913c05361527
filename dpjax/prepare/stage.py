"""The per-shard work of ``python -m dpjax.prepare``: stage, then write.

Both passes are plain functions of one unit (an input shard; an output
shard), so any engine can run them: the local process pool or Apache Beam
(``run.run_units``). Each is resumable: it writes to a temporary name,
renames, and leaves a done-marker holding a fingerprint of its inputs and
options; a rerun skips a unit whose marker matches.

Stage (input shard -> ``<work>/<shard>.{arrayrecord,npz,json}``): read each
sample, drop it with a reason if unusable (unreadable, corrupt image,
missing caption / user / label), else decode it, hash it (``dedup``),
optionally resize + re-encode it, and store the finished record. The
hashes go to the ``.npz``; the ``.json`` (written last: the done-marker)
holds drops, keys, users and labels.

Write (output shard): copy staged records, chosen and ordered by the global
plan (``plan``), into ``data-XXXXX-of-YYYYY.arrayrecord``.
"""

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from dpjax.prepare import dedup
from dpjax.prepare import readers
from dpjax.prepare import records as records_lib

DEFAULT_JPEG_QUALITY = 95  # When resizing without --jpeg_quality.


@dataclasses.dataclass(frozen=True)
class Options:
  """What a staged record is made of (all of it is in the fingerprint)."""
  image_size: int = 0  # Shorter side; 0 keeps the original bytes.
  jpeg_quality: int = 0  # > 0 re-encodes as JPEG q; 0: only when resizing.
  caption_key: str = "caption"  # "" = no caption field.
  user_key: str = ""
  label_key: str = ""
  image_key: str = ""

  def fingerprint(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _decode(data: bytes):
  """A loaded PIL image, or None if the bytes are not a readable image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
  except (OSError, ValueError, SyntaxError, EOFError, MemoryError,
          Image.DecompressionBombError):
    return None


def _encode(im, opts: Options) -> bytes:
  """Shorter side to ``opts.image_size`` (never upscaled), then JPEG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = im.convert("L" if im.mode in ("1", "L", "I;16") else "RGB")
  w, h = im.size
  s = opts.image_size
  if s and min(w, h) > s:
    im = im.resize((max(1, round(w * s / min(w, h))),
                    max(1, round(h * s / min(w, h)))),
                   Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, format="JPEG",
          quality=opts.jpeg_quality or DEFAULT_JPEG_QUALITY)
  return buf.getvalue()


def _field(fields: dict[str, Any], key: str) -> Any:
  v = fields.get(key)
  return None if v is None or (isinstance(v, str) and not v.strip()) else v


def prepare_sample(sample: readers.Sample, opts: Options
                   ) -> tuple[dict[str, Any], bytes, int] | str:
  """(record, exact hash, dHash) of a usable sample, else a drop reason."""
  if sample.error:
    return sample.error
  if not sample.image:
    return "missing_image"
  record: dict[str, Any] = {"key": sample.key}
  if opts.caption_key:
    caption = _field(sample.fields, opts.caption_key)
    if caption is None:
      return "missing_caption"
    record["caption"] = str(caption)
  if opts.user_key:
    user = _field(sample.fields, opts.user_key)
    if user is None:
      return "missing_user"
    record["user"] = user
  if opts.label_key:
    try:
      record["label"] = int(sample.fields[opts.label_key])
    except (KeyError, TypeError, ValueError):
      return "bad_label"
  im = _decode(sample.image)
  if im is None:
    return "corrupt_image"
  rgb = im.convert("RGB")
  resize = opts.image_size or opts.jpeg_quality
  record["image"] = _encode(im, opts) if resize else bytes(sample.image)
  return record, dedup.pixel_hash(np.asarray(rgb)), dedup.dhash(rgb)


def _paths(work_dir: str, name: str) -> dict[str, str]:
  base = os.path.join(work_dir, name)
  return {k: f"{base}.{k}" for k in ("arrayrecord", "npz", "json")}


def load_summary(work_dir: str, name: str) -> dict[str, Any] | None:
  """A staged shard's summary (its done-marker), or None if not done."""
  path = _paths(work_dir, name)["json"]
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def load_hashes(work_dir: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8[n, 16] exact hashes, uint64[n] dHashes) of a staged shard."""
  with np.load(_paths(work_dir, name)["npz"]) as z:
    return z["exact"], z["near"]


def _stamp(shard: readers.InputShard) -> list[int]:
  """Size and mtime of the shard's file (a folder: its index), so a changed
  input is staged again."""
  path = shard.path
  if shard.format == "folder":
    path = next(p for p in (os.path.join(path, n) for n in (
        "captions.jsonl", "captions.csv")) if os.path.exists(p))
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns, shard.start, shard.stop]


def stage_shard(shard: readers.InputShard, opts: Options,
                work_dir: str) -> str:
  """Stages one input shard (skipped if already done with these options).

  Returns:
    The shard's name (its summary: ``load_summary(work_dir, name)``).
  """
  stamp = _stamp(shard)
  done = load_summary(work_dir, shard.name)
  if done is not None and (done["options"], done["stamp"]) == (
      opts.fingerprint(), stamp):
    return shard.name
  paths = _paths(work_dir, shard.name)
  kept, exact, near, dropped = [], [], [], []
  payloads = []
  for sample in readers.read_shard(shard, opts.image_key):
    out = prepare_sample(sample, opts)
    if isinstance(out, str):
      dropped.append([sample.key, out])
      continue
    record, h, d = out
    payloads.append(records_lib.pack_record(record))
    kept.append({k: record.get(k) for k in ("key", "user", "label")})
    exact.append(np.frombuffer(h, np.uint8))
    near.append(d)
  records_lib.write_packed(paths["arrayrecord"] + ".tmp", payloads)
  os.replace(paths["arrayrecord"] + ".tmp", paths["arrayrecord"])
  with open(paths["npz"] + ".tmp", "wb") as f:
    np.savez(f, exact=np.asarray(exact, np.uint8).reshape(
        -1, dedup.HASH_BYTES), near=np.asarray(near, np.uint64))
  os.replace(paths["npz"] + ".tmp", paths["npz"])
  summary = {"options": opts.fingerprint(), "stamp": stamp,
             "input": shard.path,
             "num_read": len(kept) + len(dropped), "dropped": dropped,
             "keys": [r["key"] for r in kept],
             "users": [r["user"] for r in kept] if opts.user_key else None,
             "labels": [r["label"] for r in kept] if opts.label_key else None}
  with open(paths["json"] + ".tmp", "w", encoding="utf-8") as f:
    json.dump(summary, f)
  os.replace(paths["json"] + ".tmp", paths["json"])
  return shard.name


@dataclasses.dataclass(frozen=True)
class OutputShard:
  """Output shard ``file``: row r is staged record ``positions[r]`` of
  staged shard ``names[shards[r]]`` (compact: plans hold N of these rows),
  staged with ``options`` (``Options.fingerprint``)."""
  file: str
  names: tuple[str, ...]
  shards: np.ndarray  # int32[rows]
  positions: np.ndarray  # int64[rows]
  options: str

  def __len__(self) -> int:
    return len(self.positions)

  def fingerprint(self) -> str:
    h = hashlib.sha256(json.dumps([self.options, self.names]).encode())
    h.update(np.asarray(self.shards, np.int32).tobytes())
    h.update(np.asarray(self.positions, np.int64).tobytes())
    return h.hexdigest()


def write_shard(shard: OutputShard, work_dir: str, out_dir: str) -> str:
  """Writes one output shard (skipped if done with the same rows)."""
  marker = os.path.join(work_dir, shard.file + ".done")
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      if f.read() == shard.fingerprint():
        return shard.file
  path = os.path.join(out_dir, shard.file)
  records_lib.write_packed(path + ".tmp", _read_rows(shard, work_dir))
  os.replace(path + ".tmp", path)
  with open(marker, "w", encoding="utf-8") as f:
    f.write(shard.fingerprint())
  return shard.file


def _read_rows(shard: OutputShard, work_dir: str):
  """Staged payloads in row order (runs of one staged shard are read
  together; user-grouped rows jump between shards, so readers stay open)."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  opened = {}
  rows = len(shard)
  try:
    i = 0
    while i < rows:
      j = i
      while j < rows and shard.shards[j] == shard.shards[i]:
        j += 1
      name = shard.names[shard.shards[i]]
      if name not in opened:
        opened[name] = array_record_module.ArrayRecordReader(
            _paths(work_dir, name)["arrayrecord"])
      yield from opened[name].read([int(p) for p in shard.positions[i:j]])
      i = j
  finally:
    for r in opened.values():
      r.close()
