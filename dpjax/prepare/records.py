"""The record format of ``arrayrecord:`` sources: msgpack maps in ArrayRecord.

A record is ``{field: bytes | str | int | float | list | dict}`` with the
image as encoded PNG/JPEG bytes under "image"; files are written with group
size 1 so that every record is read alone (random access for Poisson
sampling). ``python -m dpjax.prepare`` and the test fixtures
(``tools/make_fixtures.py``) write them.
"""

from typing import Any, Iterable, Mapping

import numpy as np


def encode_image(image: np.ndarray, fmt: str = "PNG") -> bytes:
  """uint8[H, W, 3] -> PNG (or JPEG) bytes."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def write_arrayrecord(path: str, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes records as msgpack maps into one ArrayRecord file.

  Numpy image arrays under "image" are PNG-encoded; other values must be
  msgpack types (bytes, str, int, float, bool, lists, dicts).

  Returns:
    The number of records written.
  """
  return write_packed(path, (pack_record(r) for r in records))


def pack_record(record: Mapping[str, Any]) -> bytes:
  """One record as the msgpack map ``arrayrecord:`` sources read."""
  import msgpack  # pylint: disable=g-import-not-at-top
  rec = dict(record)
  if isinstance(rec.get("image"), np.ndarray):
    rec["image"] = encode_image(rec["image"])
  rec = {k: (v.item() if isinstance(v, np.generic) else v)
         for k, v in rec.items()}
  return msgpack.packb(rec, use_bin_type=True)


def write_packed(path: str, payloads: Iterable[bytes]) -> int:
  """Writes already-packed records into one ArrayRecord file (group size 1:
  each record is read alone, as random access needs). Returns the count."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  n = 0
  for data in payloads:
    writer.write(data)
    n += 1
  writer.close()
  return n
