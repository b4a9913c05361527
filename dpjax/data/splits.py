"""Public/private split of one source, decided record by record.

DP continual pretraining (Bu et al. 2024) trains non-privately on a public
share of a dataset and then with DP on the rest. The private phase must see
a source over ONLY the private records, so that the Poisson sampler over
``[0, N_priv)`` cannot produce a public record and the accountant's N is
``N_priv``. ``public_private_split(source, fraction, seed)`` returns two
``Subset`` views for that.

Guarantee (adjacency, PRIVACY.md): a record's share is a function of that
record and the public ``split_seed`` only: record r is public iff
``U(seed, record_key(r)) < fraction``, with U a keyed hash read as a
uniform in [0, 1). Never of N, of its position or of other records:
adding, removing or moving one record changes no other record's share.
Share sizes are therefore random (N_pub ~ Binomial(N, fraction)); N_priv,
like N, is treated as public (PRIVACY.md item 9).

A record's key (``record_key``) is its key field ("key", as the prepared
ArrayRecord records of ``python -m dpjax.prepare`` carry: the
webdataset ``__key__``, parquet "key" or the folder file name; or
"__key__") when it has one, else a hash of its canonical bytes (every field
sorted by name, with type, dtype and shape). The key field is part of the
record, so either way the share is a function of the record; records that
share a key value (parquet input without a key column is keyed by its row
number in each file) share a share. A source may instead offer
``record_keys()``, returning ``uint64[N]`` keys or ``(keys, bool[N]
readable)``, so that start-up neither renders nor decodes every record: the
synthetic generators (record i's generator key, of which it is a pure
function) and the real-data sources of ``sources.make_source``
(``stored_keys``: one batched pass with images left encoded; exactly
``record_key(source[i])`` for ArrayRecord and folder sources and for TFDS
records with a key field, else the hash of the TFDS record as stored, with
its images encoded). Otherwise start-up calls ``source[i]`` for every i.
"""

import hashlib
from typing import Any, Mapping

import numpy as np

from dpjax.data import BadRecord
from dpjax.errors import ConfigError
from dpjax.privacy import sampling

KEY_FIELDS = ("key", "__key__")
_U64 = 0xFFFFFFFFFFFFFFFF


def _hasher(tag: bytes):
  return hashlib.blake2b(digest_size=8, person=b"dpjax-" + tag)


def _feed(h, value: Any) -> None:
  """Feeds a canonical, length-prefixed encoding of ``value`` into h."""
  if isinstance(value, Mapping):
    h.update(b"d%d:" % len(value))
    for k in sorted(value, key=str):
      _feed(h, str(k))
      _feed(h, value[k])
  elif isinstance(value, (list, tuple)):
    h.update(b"l%d:" % len(value))
    for v in value:
      _feed(h, v)
  elif isinstance(value, str):
    data = value.encode("utf-8")
    h.update(b"s%d:" % len(data) + data)
  elif isinstance(value, (bytes, bytearray, memoryview)):
    data = bytes(value)
    h.update(b"b%d:" % len(data) + data)
  elif value is None:
    h.update(b"n")
  elif isinstance(value, int) and not -2**63 <= value < 2**63:
    h.update(b"I%d:" % value)  # beyond int64: its decimal digits.
  else:
    a = np.asarray(value)
    if a.dtype.hasobject:
      raise TypeError(f"record_key: cannot hash a value of type "
                      f"{type(value).__name__}")
    head = f"a{a.dtype.str}{a.shape}:".encode()
    h.update(head + a.tobytes())


def record_key(record: Any) -> int:
  """The 64-bit key that decides ``record``'s share.

  Its key field (``KEY_FIELDS``, the first present and not None) if it has
  one, else a BLAKE2b-64 hash of its canonical bytes: every field sorted by
  name, each with its type, dtype and shape (python ints / floats hash as
  int64 / float64, so ``3`` and ``np.int64(3)`` agree, ``np.int32(3)``
  does not). Equal records get equal keys; distinct ones collide with
  probability ~N^2 / 2^65, which only puts the two in the same share.
  """
  if isinstance(record, Mapping):
    for field in KEY_FIELDS:
      if record.get(field) is not None:
        h = _hasher(b"key")
        _feed(h, record[field])
        return int.from_bytes(h.digest(), "little")
  h = _hasher(b"record")
  _feed(h, record)
  return int.from_bytes(h.digest(), "little")


def source_keys(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """(uint64[N] keys, bool[N] readable) of every record, in one pass.

  ``source.record_keys()`` when the source offers it (keys, all readable,
  or a (keys, readable) pair), else ``record_key(source[i])`` for each i; a
  record that raises ``BadRecord`` is unreadable (key 0).
  """
  fast = getattr(source, "record_keys", None)
  if fast is not None:
    out = fast()
    keys, readable = out if isinstance(out, tuple) else (out, None)
    keys = np.asarray(keys, np.uint64)
    readable = (np.ones(len(source), bool) if readable is None
                else np.asarray(readable, bool))
    if keys.shape != (len(source),) or readable.shape != keys.shape:
      raise ValueError(f"{source!r}.record_keys() has shape {keys.shape}, "
                       f"not ({len(source)},)")
    return keys, readable
  n = len(source)
  keys, readable = np.zeros(n, np.uint64), np.ones(n, bool)
  for i in range(n):
    try:
      keys[i] = record_key(source[i])
    except BadRecord:
      readable[i] = False
  return keys, readable


def share_uniforms(keys: np.ndarray, seed: int) -> np.ndarray:
  """float64 in [0, 1) per key: a keyed hash of (seed, key), vectorised.

  Two rounds of SplitMix64 mixing, each with its own 64-bit word derived
  from ``seed`` by BLAKE2b: record-wise, seed-dependent and N-independent.
  """
  h = _hasher(b"seed")
  _feed(h, int(seed))
  w = int.from_bytes(h.digest(), "little")
  s1, s2 = np.uint64(w), np.uint64((w * 0x9E3779B97F4A7C15) & _U64 | 1)
  with np.errstate(over="ignore"):
    z = sampling.finalize64(
        sampling.finalize64(np.asarray(keys, np.uint64) ^ s1) + s2)
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class Subset:
  """A random-access view of ``source`` at the underlying indices
  ``indices`` (ascending): ``view[i]`` is ``source[indices[i]]``.

  Holds the index array (int32 when N < 2^31, else int64: 4 or 8 bytes per
  record of the view), so a view pickles into each Grain worker with it.
  Any ``i`` outside ``[0, len(view))`` raises IndexError (a sampler bug can
  never silently read outside the view).
  """

  def __init__(self, source: Any, indices: np.ndarray, name: str = ""):
    n = len(source)
    dtype = np.int32 if n < 2**31 else np.int64
    idx = np.asarray(indices, dtype)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= n)):
      raise ValueError(f"indices must be 1-d within [0, {n})")
    self.source, self.indices, self.name = source, idx, name

  def __len__(self) -> int:
    return int(self.indices.size)

  def source_index(self, index: int) -> int:
    """The index in the underlying source of view index ``index``."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    return int(self.indices[index])

  def source_indices(self) -> np.ndarray:
    """int64[len(self)]: all underlying indices, ascending."""
    return self.indices.astype(np.int64)

  def describe(self, index: int) -> str:
    """The underlying source's name of view record ``index`` (or "")."""
    fn = getattr(self.source, "describe", None)
    return str(fn(self.source_index(index))) if fn is not None else ""

  def __getitem__(self, index: int) -> Any:
    return self.source[self.source_index(index)]

  def __repr__(self) -> str:
    return (f"Subset({self.source!r}, {self.name} share: {len(self)} "
            "records)")


def public_private_split(source: Any, fraction: float, seed: int, *,
                         field: str = "data.public_fraction"
                         ) -> tuple[Subset, Subset]:
  """Splits ``source`` into disjoint (public, private) views, record-wise.

  Guarantee: record r is public iff ``share_uniforms([record_key(r)],
  seed) < fraction`` (module docstring): a function of r and ``seed``
  only, so one record added or removed changes no other record's share.
  Exact duplicates (same key) land in the same share: de-duplicate first
  (PRIVACY.md item 7). Unreadable records (``BadRecord`` while reading the
  key) go to the private share, where they are zero rows like any bad
  record; a read error that comes and goes would move such a record.

  Cost: one pass over the source at each start (``source_keys``), no image
  decoded: ~8 us per msgpack ArrayRecord record and ~33 us per TFDS example
  from the page cache (``sources.FieldMapSource.record_keys``), plus
  reading the data once (ImageNet-21k-P's 11.8M records: minutes); a
  synthetic source's ``record_keys`` take ~0.6 s at that N, 0.3 ms for
  ``:tiny``'s 20,000.
  Memory O(N): 4 bytes per record in the views (int32 indices), ~16 bytes
  per record while splitting.

  Args:
    source: random-access source (``len`` + ``getitem``), e.g. a list of
      dict records.
    fraction: the expected public share in (0, 1) (Bu et al.: 0.1).
    seed: the public split seed (``data.split_seed``).
    field: the config field ``fraction`` came from (for errors).

  Returns:
    (public view, private view); ``len(private)`` is N_priv.

  Raises:
    ConfigError: ``fraction`` outside (0, 1), or a share came out empty.
  """
  if not 0.0 < fraction < 1.0:
    raise ConfigError(f"config.{field}={fraction!r} is invalid: the public "
                      "share must be in (0, 1)")
  keys, readable = source_keys(source)
  public = readable & (share_uniforms(keys, seed) < fraction)
  n_pub = int(public.sum())
  if not 0 < n_pub < len(source):
    empty = "public" if n_pub == 0 else "private"
    unread = int((~readable).sum())
    why = (f" ({unread} records could not be read and went to the private "
           "share: fix the data or data.fields first)" if unread else "")
    raise ConfigError(
        f"config.{field}={fraction!r} is invalid: the split of N="
        f"{len(source)} records left the {empty} share empty ({n_pub} "
        f"public){why}; use a {'larger' if n_pub == 0 else 'smaller'} "
        f"{field}, more data, or a second public source (public.source)")
  return (Subset(source, np.flatnonzero(public), "public"),
          Subset(source, np.flatnonzero(~public), "private"))


class Appended:
  """``source`` followed by a list of extra records (e.g. audit canaries).

  ``view[i]`` is ``source[i]`` for ``i < len(source)`` and
  ``extra[i - len(source)]`` after; the extra records become ordinary members
  of the dataset (sampled, clipped and accounted like any other).

  >>> v = Appended(["a", "b"], ["z"])
  >>> len(v), v[1], v[2]
  (3, 'b', 'z')
  """

  def __init__(self, source: Any, extra: list[Any]):
    self.source, self.extra = source, list(extra)
    self._n = len(source)

  def __len__(self) -> int:
    return self._n + len(self.extra)

  def __getitem__(self, index: int) -> Any:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    return self.source[index] if index < self._n else self.extra[
        index - self._n]

  def __repr__(self) -> str:
    return f"Appended({self.source!r}, +{len(self.extra)} records)"
