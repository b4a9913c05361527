"""Readers of the input formats that ``python -m dpjax.prepare`` converts.

Each input is cut into ``InputShard``s (the unit of parallel work and of
resumption) and ``read_shard`` yields its ``Sample``s in a fixed order:

* ``webdataset``: ``.tar`` shards as written by img2dataset: members grouped
  the way webdataset groups them (consecutive members sharing the path up to
  the first dot of the basename: ``00001.jpg``, ``00001.txt``,
  ``00001.json``). The ``.txt`` member is the caption (also under "txt"),
  ``.json`` fields are merged in, ``.cls`` is an integer under "cls".
* ``parquet``: ``.parquet`` files, one row per sample; the image column
  holds bytes (or a ``{"bytes": ...}`` struct, as Hugging Face writes).
* ``folder``: a directory with ``captions.jsonl`` / ``captions.csv`` (the
  layout ``sources.FolderSource`` reads, with ``folder_index.read``), cut
  into
  chunks of rows.

A sample that cannot be read carries ``error`` (a drop reason) instead of
failing the job; a shard that breaks off (a truncated tar) yields one such
sample and ends.
"""

import dataclasses
import functools
import glob as glob_lib
import json
import os
import re
import tarfile
from typing import Any, Iterator

from dpjax.data import folder_index

FORMATS = ("webdataset", "folder", "parquet")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_EXTENSION = {"webdataset": ".tar", "parquet": ".parquet"}
# webdataset.tariterators.base_plus_ext: key = path up to the first dot of
# the basename; ext = the rest, lower-cased.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclasses.dataclass(frozen=True)
class InputShard:
  """One unit of input: a file, or rows [start, stop) of a folder index."""
  name: str  # Unique, file-system-safe; names staging files.
  path: str
  format: str
  start: int = 0
  stop: int = 0


@dataclasses.dataclass
class Sample:
  """One input record before preparation.

  ``fields`` holds the sample's metadata (caption, label, user, ...);
  ``error`` is a drop reason when the sample could not be read at all.
  """
  key: str
  image: bytes | None = None
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  error: str | None = None


def list_shards(input_spec: str, fmt: str,
                rows_per_chunk: int) -> list[InputShard]:
  """The input's shards in a fixed (sorted) order.

  Args:
    input_spec: a directory or a glob (webdataset, parquet); the directory
      holding the caption index (folder).
    fmt: one of ``FORMATS``.
    rows_per_chunk: folder only: index rows per shard.

  Raises:
    ValueError / FileNotFoundError: unknown format, or nothing to read.
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: use one of {FORMATS}.")
  if fmt == "folder":
    n = len(folder_index.read(input_spec))
    return [InputShard(f"rows-{a:010d}", input_spec, fmt, a,
                       min(a + rows_per_chunk, n))
            for a in range(0, n, rows_per_chunk)]
  ext = _EXTENSION[fmt]
  pattern = (os.path.join(input_spec, "*" + ext) if os.path.isdir(input_spec)
             else input_spec)
  paths = sorted(glob_lib.glob(pattern))
  if not paths:
    raise FileNotFoundError(f"--input={input_spec!r}: no {ext} files (looked "
                            f"for {pattern!r}); fix --input or --format.")
  return [InputShard(f"{i:06d}-{_safe(os.path.basename(p))}", p, fmt)
          for i, p in enumerate(paths)]


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def read_shard(shard: InputShard, image_key: str = "") -> Iterator[Sample]:
  """The shard's samples in order (``image_key`` "" = the first image
  extension / column found)."""
  if shard.format == "webdataset":
    return _read_tar(shard.path, image_key)
  if shard.format == "parquet":
    return _read_parquet(shard.path, image_key)
  return _read_folder(shard)


def _read_tar(path: str, image_key: str) -> Iterator[Sample]:
  key, members = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:  # Streaming: one pass, any size.
      for info in tar:
        m = _KEY_EXT.match(info.name) if info.isfile() else None
        if m is None:
          continue
        if m.group(1) != key and key is not None:
          yield _tar_sample(key, members, image_key)
          members = {}
        key = m.group(1)
        members[m.group(2).lower()] = tar.extractfile(info).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    yield Sample(f"{key or '<start>'}+", error="unreadable_input",
                 fields={"detail": f"{type(e).__name__}: {e}"})
    return
  if key is not None:
    yield _tar_sample(key, members, image_key)


def _tar_sample(key: str, members: dict[str, bytes],
                image_key: str) -> Sample:
  fields: dict[str, Any] = {}
  if "json" in members:
    try:
      meta = json.loads(members["json"])
    except ValueError:
      return Sample(key, error="bad_metadata")
    if not isinstance(meta, dict):
      return Sample(key, error="bad_metadata")
    fields.update(meta)
  if "txt" in members:
    text = members["txt"].decode("utf-8", errors="replace")
    fields["txt"] = text
    fields.setdefault("caption", text)
  if "cls" in members:
    try:
      fields["cls"] = int(members["cls"].decode().strip())
    except ValueError:
      return Sample(key, error="bad_metadata")
  names = (image_key,) if image_key else IMAGE_EXTS
  image = next((members[e] for e in names if e in members), None)
  return Sample(key, image, fields)


def _read_parquet(path: str, image_key: str) -> Iterator[Sample]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  row = 0
  try:
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    col = image_key or next(
        (c for c in ("jpg", "image", "png", "webp", "jpeg") if c in names),
        "")
    for batch in pf.iter_batches(batch_size=256):
      for rec in batch.to_pylist():
        image = rec.pop(col, None)
        if isinstance(image, dict):  # {"bytes": ..., "path": ...}
          image = image.get("bytes")
        key = str(rec["key"]) if rec.get("key") is not None else str(row)
        yield Sample(key, image, rec)
        row += 1
  except (OSError, ValueError) as e:  # pyarrow's errors subclass these.
    yield Sample(f"row {row}+", error="unreadable_input",
                 fields={"detail": f"{type(e).__name__}: {e}"})


@functools.lru_cache(maxsize=1)  # One parse per worker process, not shard.
def _folder_index(directory: str) -> tuple[dict[str, Any], ...]:
  return tuple(folder_index.read(directory))


def _read_folder(shard: InputShard) -> Iterator[Sample]:
  rows = _folder_index(shard.path)
  for i in range(shard.start, shard.stop):
    row = dict(rows[i])
    if folder_index.BAD_ROW in row:
      yield Sample(f"row {i}", error="unreadable_input",
                   fields={"detail": row[folder_index.BAD_ROW]})
      continue
    name = str(row.get("file") or "")
    if not name:
      yield Sample(f"row {i}", error="missing_image")
      continue
    try:
      with open(os.path.join(shard.path, name), "rb") as f:
        image = f.read()
    except OSError:
      image = None
    yield Sample(name, image, row)
