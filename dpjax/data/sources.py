"""Random-access data sources, resolved from a config string.

``make_source(spec, split=..., data_dir=...)`` understands:

* ``synthetic:shapes`` | ``synthetic:classes`` | ``synthetic:textures`` |
  ``synthetic:identities``: embedded procedural data (``synthetic/``, a
  module per generator);
  keyword args go to the constructor (``num_examples``, ``image_size``,
  ``seed``; ``num_identities``, ``images_per_identity``, ``first_identity``).
* ``tfds:<name>[:<version>]``: a *prepared* TFDS dataset in ArrayRecord
  format, read with ``tfds.data_source`` (no TensorFlow needed; images are
  decoded by tfds with Pillow). ``fields={"caption": "captions/text"}``
  renames (nested, "/"-separated) features to our field names.
* ``arrayrecord:<glob>``: ArrayRecord files whose records are msgpack maps
  ``{field: bytes | str | int | float | list}`` with encoded images (PNG or
  JPEG bytes) under "image" (write them with
  ``dpjax.prepare.records.write_arrayrecord``).
* ``arrayrecord:<dir>`` where ``<dir>/manifest.json`` exists (the output of
  ``python -m dpjax.prepare``): N, shards and fields come from the
  manifest; a config N that differs is an error (``prepared_source``).
* ``folder:<dir>``: image files plus ``captions.jsonl`` (one
  ``{"file": "a.png", "caption": "...", "label": 3}`` per line, label
  optional) or ``captions.csv`` (header ``file,caption[,label]``).

``FieldMapSource.record_keys`` gives DP continual's split the records'
keys in one pass without decoding an image (``stored_keys``).

Records are plain dicts. Encoded images stay bytes here; ``transforms.
DecodeImage`` decodes them inside grain worker processes. Text fields are
returned as ``str``.

A record that cannot be read (a missing file, an unreadable or malformed
stored record, an index row without a file name) raises
``dpjax.data.BadRecord``; the pipelines make it a zero row, and start-up
validation (``bad_records.validate_phases``) lists every such record. The
record still counts in ``len(source)`` (N): keeping N is conservative.
"""

import glob as glob_lib
import os
from typing import Any, Iterable, Mapping

import numpy as np

from dpjax import errors
from dpjax.data import BadRecord
from dpjax.data import folder_index
from dpjax.data import manifest as manifest_lib
from dpjax.data import stored_keys
from dpjax.data import synthetic

_SYNTHETIC = {
    "shapes": synthetic.ShapesCaptions,
    "classes": synthetic.Classes,
    "textures": synthetic.Textures,
    "identities": synthetic.Identities,
}
_TEXT_FIELDS = ("caption", "text", "file")
# What a wrapped random-access source raises for one unreadable record
# (tfds decodes inside __getitem__; IndexError, a sampler bug, propagates).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def layers(source: Any, depth: int = 16) -> list[Any]:
  """``source`` and the sources it wraps (following ``.source``)."""
  out = [source]
  while len(out) < depth and getattr(out[-1], "source", None) is not None:
    out.append(out[-1].source)
  return out


def is_generated(source: Any) -> bool:
  """True for procedural (synthetic) data, possibly wrapped (splits,
  appended canaries): it cannot hold a bad record."""
  return any(isinstance(s, tuple(_SYNTHETIC.values()))
             for s in layers(source))


def is_folder(source: Any) -> bool:
  """True if ``source`` reads a ``folder:`` directory (possibly wrapped)."""
  return any(isinstance(s, FolderSource) for s in layers(source))


def describe(source: Any, index: int) -> str:
  """A short name of record ``index`` for error messages: the file name of
  a folder record, else "" (only sources with ``describe`` say more)."""
  fn = getattr(source, "describe", None)
  try:
    return str(fn(int(index))) if fn is not None else ""
  except (IndexError, KeyError):
    return ""


def _to_str(v: Any) -> Any:
  return v.decode("utf-8") if isinstance(v, bytes) else v


def _get_path(record: Mapping[str, Any], path: str) -> Any:
  value = record
  for part in path.split("/"):
    value = value[part]
  return value


class FieldMapSource:
  """Wraps a source: renames fields and turns text fields into ``str``.

  Args:
    source: any random-access source returning dicts.
    fields: {our_name: source_path}; "/" walks nested dicts. Unmapped
      top-level fields are kept under their own names.
    text_fields: fields decoded from bytes to str.
  """

  def __init__(self, source: Any, fields: Mapping[str, str] | None = None,
               text_fields: Iterable[str] = _TEXT_FIELDS):
    self.source = source
    self.fields = dict(fields or {})
    self.text_fields = tuple(text_fields)

  def __len__(self) -> int:
    return len(self.source)

  def describe(self, index: int) -> str:
    return describe(self.source, index)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      raw = self.source[int(index)]
    except _READ_ERRORS as e:
      raise BadRecord("read", f"{type(e).__name__}: {e}") from e
    return self._map(raw)

  def record_keys(self) -> tuple[np.ndarray, np.ndarray]:
    """(uint64[N] split keys, bool[N] readable), one pass, no image decode.

    Key i is ``splits.record_key(self[i])`` for ArrayRecord (msgpack) and
    folder sources; for TFDS it is ``record_key`` of the record with its
    images still encoded, which equals ``record_key(self[i])`` when the
    record has a key field (``stored_keys``). Either way a function of the
    stored record only. Read in chunks with the reader's batch read; a
    record that cannot be read (``BadRecord``) is unreadable. Cost: ~8 us
    per msgpack record, ~33 us per TFDS example (``stored_keys``).
    """
    read = getattr(self.source, "stored_records", None)
    if read is None:
      read = stored_keys.tfds_reader(self.source, _READ_ERRORS)
    if read is None:
      read = stored_keys.each(lambda i: self.source[i], _READ_ERRORS)
    return stored_keys.key_pass(len(self), read, self._map)

  def _map(self, raw: Any) -> dict[str, Any]:
    """The record ``raw`` (a stored record) under our field names."""
    if not isinstance(raw, Mapping):
      raise BadRecord("read", f"the stored record is a {type(raw).__name__},"
                      " not a map of fields")
    used = {p.split("/")[0] for p in self.fields.values()}
    out = {k: v for k, v in raw.items() if k not in used}
    for name, path in self.fields.items():
      try:
        out[name] = _get_path(raw, path)
      except (KeyError, TypeError) as e:
        # One record without it is a bad record; a typo in data.fields
        # makes every record bad, which the pipeline reports as an error.
        raise BadRecord(
            "missing_field",
            f"data.fields[{name!r}]={path!r}: the record has no such field; "
            f"its fields are {sorted(raw)}. Fix data.fields.") from e
    for k in self.text_fields:
      if k in out:
        out[k] = _to_str(out[k])
    return out

  def __repr__(self) -> str:
    return f"FieldMapSource({self.source!r}, fields={self.fields})"


def tfds_source(name: str, *, split: str, data_dir: str | None = None,
                fields: Mapping[str, str] | None = None) -> FieldMapSource:
  """A prepared ArrayRecord TFDS dataset via ``tfds.data_source``.

  Args:
    name: "<name>" or "<name>:<version>".
    split: TFDS split string ("train", "test[:10%]", ...).
    data_dir: TFDS data directory (default: TFDS's, ~/tensorflow_datasets).
    fields: renames, see ``FieldMapSource``.

  Returns:
    A random-access source of dicts.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir,
                          download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"data.source='tfds:{name}' (split={split!r}) could not be opened "
        f"under data_dir={where}: {type(e).__name__}: {str(e)[:300]}\n"
        f"Fix: prepare it in ArrayRecord format, e.g. `tfds build {name} "
        f"--file_format=array_record --data_dir=<data_dir>` and set "
        f"data.data_dir, or use a tiny preset (e.g. configs/dpcap.py:tiny) "
        f"with data.source='synthetic:shapes'.") from e
  return FieldMapSource(ds, fields)


_AR_ERRORS = (OSError, RuntimeError, ValueError)


def _unpack(data: bytes) -> Any:
  import msgpack  # pylint: disable=g-import-not-at-top
  try:
    return msgpack.unpackb(data, raw=False)
  except (msgpack.UnpackException, ValueError) as e:
    raise BadRecord("read", f"not a msgpack record: {type(e).__name__}: "
                    f"{e}") from e


class MsgpackArrayRecordSource:
  """ArrayRecord files of msgpack-encoded dicts (``dpjax.prepare.records``).

  Args:
    paths: the files, in index order; "path[a:b]" reads records [a, b) of
      a file without opening it to count them.
    directory: the prepared directory whose ``manifest`` this is, if any.
    manifest: its parsed ``manifest.json`` (``dpjax.data.manifest``).
  """

  def __init__(self, paths: list[str], directory: str | None = None,
               manifest: Mapping[str, Any] | None = None):
    import grain  # pylint: disable=g-import-not-at-top
    self.paths = list(paths)
    self.directory, self.manifest = directory, manifest
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      data = self._source[int(index)]
    except _AR_ERRORS as e:
      raise BadRecord("read", f"ArrayRecord read failed: "
                      f"{type(e).__name__}: {e}") from e
    return _unpack(data)

  def stored_records(self, start: int, stop: int) -> list[Any]:
    """Records [start, stop) (each a dict, or the ``BadRecord`` reading it
    raised) in one batch read; what ``self[i]`` returns (no image decode)."""
    return stored_keys.batched(self._source.__getitems__, _unpack,
                               stored_keys.each(self.__getitem__),
                               _AR_ERRORS)(start, stop)

  def __repr__(self) -> str:
    if self.directory:
      return f"MsgpackArrayRecordSource({self.directory!r}, N={len(self)})"
    return f"MsgpackArrayRecordSource({self.paths})"


def prepared_source(directory: str, *, fields: Mapping[str, str] | None,
                    num_examples: int | None = None,
                    num_examples_field: str = "data.num_examples"
                    ) -> FieldMapSource:
  """A ``dpjax.prepare`` output directory, read via its manifest.

  Shards, their order and N come from ``manifest.json`` (no file is opened
  to count records). ``num_examples``, when given, must equal the
  manifest's N: N sets the sampling rate and delta.

  Raises:
    ValueError: a mismatch (naming ``num_examples_field``, both values and
      the fix) or an unreadable manifest.
    FileNotFoundError: a shard the manifest lists is missing.
  """
  m = manifest_lib.read(directory)
  manifest_lib.check_num_examples(directory, m, num_examples,
                                  num_examples_field)
  paths = []
  for shard in m["shards"]:
    path = os.path.join(directory, shard["file"])
    if not os.path.exists(path):
      raise errors.MissingFileError(
          f"data.source='arrayrecord:{directory}': {path} is listed in "
          "manifest.json but missing: copy the whole directory, or rerun "
          "`python -m dpjax.prepare` (it resumes).")
    paths.append(f"{path}[0:{int(shard['num_examples'])}]")
  return FieldMapSource(MsgpackArrayRecordSource(paths, directory, m),
                        fields)


class FolderSource:
  """Image files + captions.jsonl / captions.csv in one directory.

  Record: {"image": bytes (the file's content), "caption": str, "file": str,
  "label": int (only if the index has labels)}.

  Index lines that do not parse or lack "file" stay records (N counts every
  line) whose reading raises ``BadRecord``, as does a missing or unreadable
  file; a row without "caption" gives caption None (``Tokenize`` makes it a
  bad record). Start-up validation lists them all at once.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.rows = folder_index.read(directory)

  def __len__(self) -> int:
    return len(self.rows)

  def describe(self, index: int) -> str:
    return str(self.rows[int(index)].get("file") or "")

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self.rows[int(index)]
    if folder_index.BAD_ROW in r:
      raise BadRecord("read", r[folder_index.BAD_ROW])
    if not r.get("file"):
      raise BadRecord("missing_field", f"index row {index} has no 'file'")
    path = os.path.join(self.directory, str(r["file"]))
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError as e:
      raise BadRecord("missing_file", f"{r['file']} does not exist") from e
    except OSError as e:
      raise BadRecord("read", f"{r['file']}: {type(e).__name__}: {e}") from e
    caption = r.get("caption")
    out = {"image": data, "caption": None if caption is None else str(caption),
           "file": str(r["file"])}
    if r.get("label") not in (None, ""):
      try:
        out["label"] = int(r["label"])
      except (TypeError, ValueError) as e:
        raise BadRecord("read", f"{r['file']}: label {r['label']!r} is not "
                        "an integer") from e
    return out

  def __repr__(self) -> str:
    return f"FolderSource({self.directory!r}, {len(self)} files)"


def make_source(spec: str, *, split: str = "train",
                data_dir: str | None = None,
                fields: Mapping[str, str] | None = None,
                expect_num_examples: int | None = None,
                num_examples_field: str = "data.num_examples",
                **kwargs: Any) -> Any:
  """Resolves a ``data.source`` string to a random-access source.

  Args:
    spec: see the module docstring.
    split: "train" / "test" / a TFDS split string. For synthetic sources the
      split names a disjoint random stream.
    data_dir: TFDS data directory (tfds: only).
    fields: field renames {our_name: source_path} (tfds/arrayrecord/folder).
    expect_num_examples: the config's N; for ``arrayrecord:<dir>`` with a
      manifest, a different manifest N is an error naming
      ``num_examples_field`` (other sources ignore it).
    num_examples_field: the config field ``expect_num_examples`` came from.
    **kwargs: constructor arguments of synthetic sources.

  Returns:
    An object with ``__len__`` and ``__getitem__(i) -> dict``.
  """
  kind, _, rest = spec.partition(":")
  if kind == "synthetic":
    if rest not in _SYNTHETIC:
      raise ValueError(f"data.source={spec!r}: unknown synthetic source; use "
                       f"one of {['synthetic:' + k for k in _SYNTHETIC]}.")
    return _SYNTHETIC[rest](split=split, **kwargs)
  if kwargs:
    raise TypeError(f"data.source={spec!r} takes no extra arguments, got "
                    f"{sorted(kwargs)}.")
  if kind == "tfds":
    if not rest:
      raise ValueError(f"data.source={spec!r}: use 'tfds:<name>[:<version>]'.")
    return tfds_source(rest, split=split, data_dir=data_dir, fields=fields)
  if kind == "arrayrecord" and manifest_lib.exists(rest):
    return prepared_source(rest, fields=fields,
                           num_examples=expect_num_examples,
                           num_examples_field=num_examples_field)
  if kind == "arrayrecord":
    paths = sorted(glob_lib.glob(rest))
    if not paths:
      raise errors.MissingFileError(
          f"data.source={spec!r}: no manifest.json in and no files match "
          f"{rest!r}: prepare the data (python -m dpjax.prepare "
          f"--input=<shards> --format=webdataset --output={rest}), or fix "
          "the path or glob.")
    return FieldMapSource(MsgpackArrayRecordSource(paths), fields)
  if kind == "folder":
    if not os.path.isdir(rest):
      raise errors.MissingFileError(f"data.source={spec!r}: {rest!r} is not a "
                              "directory; point it at your image folder.")
    return FieldMapSource(FolderSource(rest), fields)
  raise ValueError(f"data.source={spec!r}: unknown kind {kind!r}; use "
                   "synthetic:<name>, tfds:<name>, arrayrecord:<glob> or "
                   "folder:<dir>.")


def from_config(spec: str, *, split: str, seed: int, num_examples: int = 0,
                image_size: int = 0, data_dir: str = "",
                fields: Mapping[str, str] | None = None,
                num_examples_field: str = "", **synthetic_kwargs: Any) -> Any:
  """The source a recipe's config fields name: the one way recipes open data.

  Args:
    spec: the config's source string (``data.source``, ``data.eval_source``,
      ``pretrain.source``, ...).
    split: its split.
    seed: ``config.seed`` (synthetic data only: public data).
    num_examples: synthetic sources are generated at this N (0: the
      generator's own default); with ``num_examples_field`` it is also the
      N a prepared ``arrayrecord:<dir>`` must have.
    image_size: synthetic image side.
    data_dir: TFDS data directory ("" = TFDS's default).
    fields: renames {our field: the data's field} of real sources.
    num_examples_field: the config field ``num_examples`` came from; set for
      private sources, whose N sets q and delta.
    **synthetic_kwargs: other constructor arguments of synthetic sources.
  """
  if spec.startswith("synthetic:"):
    kwargs = dict(synthetic_kwargs, image_size=image_size, seed=seed)
    if num_examples:
      kwargs["num_examples"] = num_examples
    return make_source(spec, split=split, **kwargs)
  return make_source(
      spec, split=split, data_dir=data_dir or None, fields=fields,
      expect_num_examples=num_examples if num_examples_field else None,
      num_examples_field=num_examples_field or "data.num_examples")

