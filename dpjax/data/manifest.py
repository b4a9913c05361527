"""``manifest.json`` of a prepared ArrayRecord directory: read, check, write.

``python -m dpjax.prepare`` writes it; ``sources.make_source(
"arrayrecord:<dir>")`` reads N, the shards and the fields from it. Keys:

  num_examples: N, the records in the shards (dense indices 0..N-1).
  shards: [{"file": "data-00000-of-00004.arrayrecord", "num_examples": n}]
    in index order.
  fields: record field names.
  image: the image policy (kept as is, or shorter side resized + JPEG q).
  source: the input (path, format, input shards, records read).
  dedup: mode, what the exact hash covers, the near-duplicate threshold,
    duplicates dropped.
  dropped: {reason: count} of input records not written (dedup included);
    ``dropped.jsonl`` lists each (input shard, key, reason).
  users (user-keyed output only): {"field", "num_users", "ranges_file"
    (JSONL lines [user id, start, stop], users in str(id) order, records of
    one user contiguous), "label_file" (int32[N] labels, .npy) or null,
    "examples_per_user" {min, median, max}}.
  command: the command line that made it.
  options: what the records depend on (a rerun with equal options is a
    no-op); format_version: this layout's version.

Everything in it is computed from the private data (counts of duplicates
and drops, user ranges): treat it as private (PRIVACY.md).
"""

import json
import os
from typing import Any

import numpy as np

FILENAME = "manifest.json"
VERSION = 1


def path_in(directory: str) -> str:
  return os.path.join(directory, FILENAME)


def exists(directory: str) -> bool:
  return os.path.isfile(path_in(directory))


def read(directory: str) -> dict[str, Any]:
  """The manifest of a prepared directory, checked for what readers use.

  Raises:
    ValueError: the file is not a manifest this version reads.
  """
  with open(path_in(directory), encoding="utf-8") as f:
    m = json.load(f)
  shards = m.get("shards") if isinstance(m, dict) else None
  if not isinstance(shards, list) or not isinstance(m.get("num_examples"),
                                                    int):
    raise ValueError(f"{path_in(directory)} is not a dpjax prepare manifest "
                     "(no num_examples / shards): rerun "
                     "`python -m dpjax.prepare` for this directory.")
  total = sum(int(s["num_examples"]) for s in shards)
  if total != m["num_examples"]:
    raise ValueError(f"{path_in(directory)}: shard counts add up to {total} "
                     f"but num_examples={m['num_examples']}; the directory "
                     "is incomplete: rerun prepare (it resumes).")
  return m


def write(directory: str, manifest: dict[str, Any]) -> None:
  """Writes atomically (a reader never sees half a manifest)."""
  tmp = path_in(directory) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, path_in(directory))


def check_num_examples(directory: str, manifest: dict[str, Any],
                       expected: int | None, field: str) -> None:
  """Raises ValueError if a config's N disagrees with the manifest's.

  A wrong N is a wrong sampling rate and delta (both are computed from it),
  so a mismatch stops the run instead of training with it.
  """
  n = manifest["num_examples"]
  if expected is not None and int(expected) != n:
    raise ValueError(
        f"{field}={int(expected)} but {path_in(directory)} says "
        f"num_examples={n} (after deduplication and dropped records). "
        f"Fix: set {field}={n}.")


def _ranges(directory: str, users: dict[str, Any]
            ) -> tuple[list[Any], np.ndarray, np.ndarray]:
  """(user ids, starts, stops) from a user-keyed directory's ranges file."""
  with open(os.path.join(directory, users["ranges_file"]),
            encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  ids = [r[0] for r in rows]
  bounds = np.asarray([r[1:] for r in rows], np.int64).reshape(-1, 2)
  return ids, bounds[:, 0], bounds[:, 1]


def user_index(source: Any, user_key: str, label_key: str
               ) -> tuple[list[Any], list[np.ndarray], np.ndarray | None
                          ] | None:
  """Per-user record indices of a user-keyed prepared directory, if
  ``source`` reads one; else None (the caller scans the user field).

  Returns (user ids, [int64 indices of each user], int32[N] labels or
  None), users in ``str(id)`` order. ``source`` may be seen through field
  renames (``sources.FieldMapSource``: has ``fields``; indices unchanged);
  any other wrapper may remap indices, so it gives None, as does a
  ``user_key`` (after renames) that is not the directory's user field.
  Labels come along when ``label_key`` is its "label" field.
  """
  names = {"user": user_key, "label": label_key}
  while source is not None:
    if getattr(source, "manifest", None) is not None:
      users = source.manifest.get("users")
      if not users or names["user"] != users["field"]:
        return None
      ids, starts, stops = _ranges(source.directory, users)
      labels = None
      if names["label"] == "label" and users.get("label_file"):
        labels = np.load(os.path.join(source.directory,
                                      users["label_file"]))
      return ids, [np.arange(a, b, dtype=np.int64)
                   for a, b in zip(starts, stops)], labels
    fields = getattr(source, "fields", None)
    if fields is None:
      return None
    names = {k: fields.get(v, v) for k, v in names.items()}
    source = getattr(source, "source", None)
  return None
