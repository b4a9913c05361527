"""Split keys of real-data sources, read without decoding images.

``splits.public_private_split`` decides each record's share from
``splits.record_key`` of the record (module docstring of ``splits``). For
the sources of ``sources.py`` this module computes those keys in one pass
over the stored records, in chunks read with the reader's batch read
(``__getitems__``: ArrayRecord reads them with threads), and with images
left encoded:

* prepared / msgpack ArrayRecord and folder sources never decode in
  ``__getitem__``: the key is exactly ``record_key(source[i])``.
* TFDS: the stored ``tf.train.Example`` is parsed with every Image / Video /
  Audio feature left as its encoded bytes (``tfds.decode.SkipDecoding``),
  other features decoded as ``source[i]`` decodes them. The key is
  ``record_key`` of that record: equal to ``record_key(source[i])`` when the
  record has a key field ("key" / "__key__", after ``data.fields``), else
  the canonical hash of the record with its images as stored (encoded), not
  as decoded pixels. Either way a function of the stored record alone, so
  the split stays record-wise (same record, same share wherever it sits).
  Not the hash of the raw proto bytes: a parsed record does not depend on
  how the proto's feature map was serialized.

Measured per record, page cache, one CPU: msgpack ArrayRecord ~8 us (~14 us
through ``source[i]``; 4,000 records of 32x32 PNGs); TFDS ~33 us (~115 us
through ``source[i]``, which decodes: 6,000 16x16 PNG examples; the gap
grows with the image size); folder ~19 us (it reads each file). On the
committed fixtures (4-6 records) it is ~100 us per record: the start of a
batch read (~0.4 ms, its thread pool) dominates.
"""

from typing import Any, Callable, Sequence

import numpy as np

from dpjax.data import BadRecord
from dpjax.data import splits

# Records per batch read: bounds the memory of one chunk of stored bytes.
CHUNK = 1024
# A chunk reader: (start, stop) -> the stored records [start, stop), each a
# record or the BadRecord that reading it raised.
Reader = Callable[[int, int], Sequence[Any]]


def key_pass(n: int, read: Reader, to_record: Callable[[Any], Any],
             chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
  """(uint64[n] keys, bool[n] readable): ``record_key(to_record(stored))``
  of every stored record, read chunk by chunk; a record whose reading or
  ``to_record`` raises ``BadRecord`` is unreadable (key 0)."""
  keys, readable = np.zeros(n, np.uint64), np.ones(n, bool)
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    stored = read(start, stop)
    if len(stored) != stop - start:
      raise ValueError(f"read {len(stored)} records of [{start}, {stop})")
    for i, raw in zip(range(start, stop), stored):
      try:
        if isinstance(raw, BadRecord):
          raise raw
        keys[i] = splits.record_key(to_record(raw))
      except BadRecord:
        readable[i] = False
  return keys, readable


def _read_one(fn: Callable[[Any], Any], arg: Any,
              errors: tuple[type, ...]) -> Any:
  """``fn(arg)``, or the ``BadRecord`` it raised (``errors`` become one)."""
  try:
    return fn(arg)
  except BadRecord as e:
    return e
  except errors as e:
    return BadRecord("read", f"{type(e).__name__}: {e}")


def each(get: Callable[[int], Any], errors: tuple[type, ...] = ()) -> Reader:
  """A chunk reader calling ``get(i)`` per record; ``errors`` (and
  ``BadRecord``) become unreadable records."""

  def read(start: int, stop: int) -> list[Any]:
    return [_read_one(get, i, errors) for i in range(start, stop)]

  return read


def batched(get_many: Callable[[list[int]], Sequence[bytes]],
            parse: Callable[[bytes], Any], fallback: Reader,
            errors: tuple[type, ...]) -> Reader:
  """A chunk reader: one batch read of the chunk's stored bytes, each then
  ``parse``d (``errors`` there: an unreadable record). A batch read that
  fails (``errors``) is retried record by record with ``fallback`` so that
  one unreadable record marks only itself."""

  def read(start: int, stop: int) -> list[Any]:
    try:
      data = get_many(list(range(start, stop)))
    except errors:
      return fallback(start, stop)
    return [_read_one(parse, d, errors) for d in data]

  return read


def _skip_media(features: Any) -> dict[str, Any]:
  """tfds decoders leaving every Image / Video / Audio feature encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  media = (tfds.features.Image, tfds.features.Video, tfds.features.Audio)
  out = {}
  for name, feature in features.items():
    if isinstance(feature, media):
      out[name] = tfds.decode.SkipDecoding()
    elif isinstance(feature, tfds.features.FeaturesDict):
      inner = _skip_media(feature)
      if inner:
        out[name] = inner
  return out


def tfds_reader(ds: Any, errors: tuple[type, ...]) -> Reader | None:
  """A chunk reader of a ``tfds.data_source`` source's records with media
  features left encoded (module docstring), or None if ``ds`` is not one
  (or was opened with its own decoders: then ``ds[i]`` decides)."""
  info = getattr(ds, "dataset_info", None)
  features = getattr(info, "features", None)
  stored = getattr(ds, "data_source", None)
  method = getattr(getattr(ds, "deserialize_method", None), "name", "")
  if (features is None or getattr(ds, "decoders", 1) is not None
      or method != "DESERIALIZE_AND_DECODE"
      or not hasattr(stored, "__getitems__")
      or not hasattr(features, "deserialize_example_np")):
    return None
  decoders = _skip_media(features)

  def parse(data: bytes) -> Any:
    return features.deserialize_example_np(data, decoders=decoders)

  def one(i: int) -> Any:
    return parse(stored[i])

  return batched(stored.__getitems__, parse, each(one, errors), errors)
