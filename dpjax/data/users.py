"""User-keyed sources for user-level DP: stable keys, user ranges, hold-out.

`UserKeyedSource` gives any record source (TFDS, ArrayRecord, ...) the
`num_users` / `user_indices(u)` interface of `synthetic.Identities`, from a
user field (e.g. an EMNIST writer id): from the user ranges of a user-keyed
`python -m dpjax.prepare` output when there is one, else by one scan.
Each user has a stable, public 64-bit key (`stable_user_key`, distinct keys
checked); `is_heldout_user` is the public hold-out rule for evaluation
writers; `AppendedUsers` adds audit canary users. `data.clients` samples
users into virtual clients (the accounted mechanism and its sensitivity
argument are in its docstring).
"""

import hashlib
from typing import Any, Callable, Sequence

import numpy as np

from dpjax.data import BadRecord
from dpjax.data import manifest
from dpjax.data import transforms as transforms_lib

_CANARY_KEY_TAG = 0xFEDE15
_KEY_PERSON = b"dpjax-user-key"  # blake2b personalisations (public).
_HELDOUT_PERSON = b"dpjax-heldout"
_U64 = 0xFFFFFFFFFFFFFFFF


def check_u64(x: Any) -> np.uint64:
  """A Python/numpy integer in [0, 2**64) as np.uint64 (seeds, steps)."""
  x = int(x)
  if not 0 <= x <= _U64:
    raise ValueError(f"expected an integer in [0, 2**64), got {x}")
  return np.uint64(x)


def keyed_hash(tag: int, seed: int, step: int, keys: np.ndarray) -> np.ndarray:
  """uint64 keyed hash of (tag, seed, step, key) for each key: the per-user
  draws of `data.clients` (a random function of its inputs when the seed is
  secret)."""
  return transforms_lib.mix(np.uint64(tag), check_u64(seed), check_u64(step),
                            np.asarray(keys, np.uint64))


def _id_bytes(user_id: Any) -> bytes:
  """Canonical bytes of a user id (str / bytes / int; numpy scalars too)."""
  if isinstance(user_id, np.generic):
    user_id = user_id.item()
  if isinstance(user_id, (bytes, bytearray)):
    return bytes(user_id)
  if isinstance(user_id, str):
    return user_id.encode("utf-8")
  return repr(user_id).encode("utf-8")


def _id_hash(user_id: Any, person: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(
      _id_bytes(user_id), digest_size=8, person=person).digest(), "little")


def stable_user_key(user_id: Any) -> int:
  """Public 64-bit key of a user id; the same in every run and process."""
  return _id_hash(user_id, _KEY_PERSON)


def is_heldout_user(user_id: Any, fraction: float) -> bool:
  """Public, deterministic hold-out rule: True for ~`fraction` of user ids.

  A fixed hash of the id alone (no seed, no data), so train and evaluation
  sources agree on it and every run holds out the same users.
  """
  if fraction <= 0:
    return False
  return _id_hash(user_id, _HELDOUT_PERSON) < fraction * 2.0**64


def _check_distinct(keys: np.ndarray) -> np.ndarray:
  if np.unique(keys).size != keys.size:
    raise ValueError("two users share a 64-bit user key (hash collision or "
                     "duplicate user ids); the sampling needs distinct keys")
  return keys


def user_keys(source: Any) -> np.ndarray:
  """uint64[N]: the source's stable user keys (default: the user index)."""
  keys = getattr(source, "user_keys", None)
  if keys is None:
    return np.arange(source.num_users, dtype=np.uint64)
  return np.asarray(keys() if callable(keys) else keys, np.uint64)


def _scan(source: Any, user_key: str, label_key: str, label_range,
          keep_user) -> dict[Any, list[int]]:
  """{user id: record indices} from one pass over the records."""
  users: dict[Any, list[int]] = {}
  for i in range(len(source)):
    try:
      rec = source[i]
    except BadRecord:  # Unreadable (e.g. a missing file): its user is
      continue  # unknown; it joins no user, like a data-preparation skip.
    if label_range is not None and not (
        label_range[0] <= int(rec[label_key]) < label_range[1]):
      continue
    u = rec[user_key]
    u = u.item() if hasattr(u, "item") else u
    if keep_user is not None and not keep_user(u):
      continue
    users.setdefault(u, []).append(i)
  return users


def _from_ranges(ids: Sequence[Any], index: Sequence[np.ndarray],
                 labels: np.ndarray | None, label_range,
                 keep_user) -> dict[Any, np.ndarray]:
  """`_scan`'s result from a prepared directory's user ranges."""
  if label_range is not None and labels is None:
    raise ValueError("a label range needs the labels: prepare the directory "
                     "with --label_key (it then writes labels.npy)")
  users = {}
  for u, idx in zip(ids, index):
    if keep_user is not None and not keep_user(u):
      continue
    if label_range is not None:
      idx = idx[(labels[idx] >= label_range[0])
                & (labels[idx] < label_range[1])]
    if idx.size:
      users[u] = idx
  return users


class UserKeyedSource:
  """A record source indexed by a user field.

  A user-keyed ``dpjax.prepare`` directory (``arrayrecord:<dir>``)
  gives each user's contiguous records (and the labels) from its manifest
  without reading a record; any other source is scanned once.

  Args:
    source: random-access source of dicts.
    user_key: field holding the user id (str, bytes or int).
    label_key: field holding the class / identity label (for filtering).
    label_range: keep only records with label in [lo, hi) (e.g. EMNIST
      trains on classes 0-35); None keeps all.
    keep_user: optional predicate on the raw user id; users for which it is
      False are left out entirely (e.g. held-out evaluation writers).
  """

  def __init__(self, source: Any, user_key: str, label_key: str = "label",
               label_range: Sequence[int] | None = None,
               keep_user: Callable[[Any], bool] | None = None):
    self.source = source
    indexed = manifest.user_index(source, user_key, label_key)
    users = (_scan(source, user_key, label_key, label_range, keep_user)
             if indexed is None else
             _from_ranges(*indexed, label_range, keep_user))
    items = sorted(users.items(), key=lambda kv: str(kv[0]))
    self._ids = [u for u, _ in items]
    self._index = [np.asarray(v, np.int64) for _, v in items]
    self._keys = _check_distinct(np.array(
        [stable_user_key(u) for u in self._ids], np.uint64))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(index)]

  @property
  def num_users(self) -> int:
    return len(self._index)

  def user_indices(self, user: int) -> np.ndarray:
    return self._index[int(user)]

  def user_id(self, user: int) -> Any:
    """The raw id (user field value) of user index ``user``."""
    return self._ids[int(user)]

  @property
  def user_keys(self) -> np.ndarray:
    """uint64[N] stable keys (a public hash of each user id)."""
    return self._keys


class AppendedUsers:
  """A user source followed by extra users (e.g. audit canary users).

  ``users[j]`` is a dict with "images" (a sequence of E images) and any
  other fields shared by that user's records (e.g. its label). User
  ``num_users_of(source) + j`` owns E new records appended after the
  source's; each is an ordinary user: sampled, clipped, noised, counted.
  Its stable key is a public hash of j (distinct from the source's keys).
  """

  def __init__(self, source: Any, users: Sequence[dict[str, Any]]):
    self.source, self._base_len = source, len(source)
    self._base_users = source.num_users
    self._records, self._index = [], []
    for user in users:
      start = self._base_len + len(self._records)
      shared = {k: v for k, v in user.items() if k != "images"}
      self._records += [dict(shared, image=im) for im in user["images"]]
      self._index.append(np.arange(start, self._base_len + len(self._records)))
    extra = transforms_lib.mix(np.uint64(_CANARY_KEY_TAG),
                 np.arange(len(self._index), dtype=np.uint64))
    self._keys = _check_distinct(
        np.concatenate([user_keys(source), extra]).astype(np.uint64))

  def __len__(self) -> int:
    return self._base_len + len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    if index < self._base_len:
      return self.source[index]
    return self._records[index - self._base_len]

  @property
  def num_users(self) -> int:
    return self._base_users + len(self._index)

  def user_indices(self, user: int) -> np.ndarray:
    user = int(user)
    if user < self._base_users:
      return self.source.user_indices(user)
    return self._index[user - self._base_users]

  @property
  def user_keys(self) -> np.ndarray:
    return self._keys


