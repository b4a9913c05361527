"""User-partitioned data for DP-FedEmb: user-keyed sources, virtual clients.

`UserKeyedSource` gives any record source (TFDS, ArrayRecord, ...) the
`num_users` / `user_indices(u)` interface of `synthetic.Identities`, from a
user field (e.g. an EMNIST writer id), plus a stable 64-bit key per user
(`user_keys`) and an optional public hold-out rule (`is_heldout_user`).
`VirtualClientLoader` produces one round's batch of virtual clients for the
training loop.

Sampling (the accounted mechanism). Round t, secret sampling seed s, public
sampling rate q, public number of virtual clients G, public capacity K:
  1. Inclusion: user u (stable key key_u) takes part iff
     H(SAMPLE, s, t, key_u) < q (a keyed hash read as a uniform in [0, 1),
     rounded so that the probability is <= q): Poisson sampling of USERS,
     each independently with probability q, expected q*N users -- the same
     distribution as `pipeline.sample_users` / `sampling.sample_indices`,
     but drawn per user so that one user's presence moves no other draw.
  2. Assignment (k >= 2): a sampled user joins virtual client
     H(CLIENT, s, t, key_u) mod G. G = ceil(expected users / k) is computed
     from public config (`train.batch_size`, the expected users q*N, passed
     in by the recipe), never from the data or its size N.
  3. Capacity (k >= 2): a client holds at most K users (jit shapes); if more
     hash into it, it keeps the K with the smallest priority
     H(PRIORITY, s, t, key_u). A client's input (its users, their example
     subsets, their order, its local-training key from (s, t, client id)) is
     therefore a function of the SET of users hashed into it only.
  With k = 1 each sampled user is its own client (no hashing, no capacity):
  plain user-level Poisson sampling. Clients with no user are skipped (they
  would contribute an exact zero).

Sensitivity argument (what `privacy.user_level.unit_clip_norm` and the
ledger's PoissonSampledDpEvent(q, Gaussian(sigma)) per round rely on).
Neighbouring datasets: D and D' = D plus one user u (add/remove one user,
with all of u's examples). All randomness above is keyed per user by the
secret seed (modelled as a random function of (tag, s, t, key), keys
distinct within a dataset), so the other users' inclusion, assignment,
priority and example subsets have the same joint distribution under D and
D' and are independent of u's draws. Condition on all of them, on u's
client and priority, and on the keyed local-training randomness. Then:
  * if u is not sampled (probability 1 - q), every client's input set is the
    same under D and D': the output sum is identical;
  * if u is sampled (probability q), only client c(u)'s input set changes
    (from A to the K smallest priorities of A + {u}; an empty A means a new
    client). Each client's backbone delta is clipped to the unit clip norm:
    C for k = 1 (a new client moves the sum by <= C), C/2 for k >= 2 (two
    points of a ball of radius C/2 are at most C apart, and a new client
    moves the sum by <= C/2). So the sum moves by a vector d, ||d|| <= C.
With the loop's noise N(0, (sigma C)^2 I), conditioned on the rest the pair
of output distributions is (N(mu, s^2), (1 - q) N(mu, s^2) + q N(mu + d,
s^2)), s = sigma C, ||d|| <= C: dominated by the Poisson-subsampled
Gaussian with sensitivity C (for both orders of the pair). The conditioned
randomness has the same law under D and D' and the hockey-stick divergence
is jointly convex, so the mixture over it keeps the bound; rounds use
fresh keyed draws (t is hashed in) and compose adaptively. Caveats: q must
be public (the loop derives it as batch_size / N, i.e. it treats N as
public); and each user's stable key must be distinct from every other
user's (`UserKeyedSource` hashes the user id to 64 bits and checks).

Element layout (this process p of P; M = virtual clients per chunk; K = 1
for k = 1):
  {"example": {"image": [n_chunks, M/P, K*E, ...], "label": [.., K*E],
               "rng": uint32[.., K*E, 2], "example_mask": [.., K*E],
               "num_users": float32[n_chunks, M/P], "unit_rng": uint32[.., 2]},
   "mask": float32[n_chunks, M/P] (virtual client is real),
   "user": int64[n_chunks, M/P] (client id in [0, G), the user index for
     k = 1; -1 = padding),
   "step", "batch_size" (users in this round's clients; a logged metric
     only)}.
Each user contributes at most E = max_examples_per_user examples (a uniform
subset from (s, t, key_u) when it has more); a client's rows are its users'
rows in priority order, then padding.
"""

import dataclasses
import hashlib
import math
from typing import Any, Callable, Sequence

import numpy as np

from dpjax.data import BadRecord
from dpjax.data import manifest
from dpjax.data import pipeline
from dpjax.data import transforms as transforms_lib

_SAMPLE_TAG = 0xFEDE10
_CLIENT_TAG = 0xFEDE11
_SUBSET_TAG = 0xFEDE12
_UNIT_TAG = 0xFEDE13
_PRIORITY_TAG = 0xFEDE14
_CANARY_KEY_TAG = 0xFEDE15
_KEY_PERSON = b"dpjax-user-key"  # blake2b personalisations (public).
_HELDOUT_PERSON = b"dpjax-heldout"
_U64 = 0xFFFFFFFFFFFFFFFF
# The data pipeline's helpers (same package), shared with UserStepLoader.
# pylint: disable=protected-access
_check_division = pipeline._check_division
_process_slots = pipeline._process_slots
_RowLoader = pipeline._RowLoader
_stack = pipeline._stack
_mix = transforms_lib._mix
# pylint: enable=protected-access


def _u64(x: Any) -> np.uint64:
  """A Python/numpy integer in [0, 2**64) as np.uint64 (seeds, steps)."""
  x = int(x)
  if not 0 <= x <= _U64:
    raise ValueError(f"expected an integer in [0, 2**64), got {x}")
  return np.uint64(x)


def _hash(tag: int, seed: int, step: int, keys: np.ndarray) -> np.ndarray:
  """uint64 keyed hash of (tag, seed, step, key) for each key."""
  return _mix(np.uint64(tag), _u64(seed), _u64(step),
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

  A user-keyed ``dpjax.data.prepare`` directory (``arrayrecord:<dir>``)
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
    extra = _mix(np.uint64(_CANARY_KEY_TAG),
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


def num_virtual_clients(expected_users: float, users_per_client: int) -> int:
  """G = ceil(expected users per round / k): public config only, never N."""
  if users_per_client < 1 or expected_users <= 0:
    raise ValueError(f"need users_per_client >= 1 and expected_users > 0, "
                     f"got {users_per_client}, {expected_users}")
  return max(1, math.ceil(expected_users / users_per_client))


def client_capacity(capacity: int, users_per_client: int) -> int:
  """Users a virtual client can hold: ``capacity``, 0 = 2k; 1 for k = 1."""
  if users_per_client == 1:
    return 1
  if capacity < 0:
    raise ValueError(f"client capacity must be >= 0, got {capacity}")
  return int(capacity) or 2 * users_per_client


def sampled_users(keys: np.ndarray, seed: int, step: int,
                  sampling_rate: float) -> np.ndarray:
  """Sorted user indices of round ``step``: each independently w.p. <= q.

  User i is in iff its keyed 53-bit uniform is < floor(q * 2**53) / 2**53,
  so its inclusion probability is q rounded down to a multiple of 2**-53.
  """
  if not 0.0 <= sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}")
  h = _hash(_SAMPLE_TAG, seed, step, keys)
  threshold = np.uint64(math.floor(sampling_rate * 2.0**53))
  return np.flatnonzero((h >> np.uint64(11)) < threshold).astype(np.int64)


@dataclasses.dataclass
class RoundClients:
  """Round t's non-empty virtual clients.

  Attributes:
    ids: int64[n] client ids, increasing (in [0, G); user indices for k = 1).
    members: n arrays of user indices (kept users, priority order).
    unit_keys: uint64[n] key of each client's local-training randomness
      (client id for k >= 2, the user's stable key for k = 1).
    num_sampled: users sampled this round (kept or dropped by capacity).
  """
  ids: np.ndarray
  members: list[np.ndarray]
  unit_keys: np.ndarray
  num_sampled: int

  @property
  def num_users(self) -> int:
    """Users whose data is in the round (after the capacity cap)."""
    return int(sum(m.size for m in self.members))


def round_clients(keys: np.ndarray, seed: int, step: int,
                  sampling_rate: float, users_per_client: int,
                  num_clients: int, capacity: int) -> RoundClients:
  """Round ``step``'s virtual clients (see the module docstring).

  Args:
    keys: uint64[N] distinct stable user keys (`user_keys(source)`).
    seed: secret sampling seed in [0, 2**64).
    step: round.
    sampling_rate: q, each user's inclusion probability.
    users_per_client: k (1: each sampled user is its own client).
    num_clients: G (k >= 2), from public config (`num_virtual_clients`).
    capacity: K >= 1 users per client (k >= 2; `client_capacity`).
  """
  keys = np.asarray(keys, np.uint64)
  users = sampled_users(keys, seed, step, sampling_rate)
  if users_per_client == 1:
    return RoundClients(users.copy(), [users[i:i + 1]
                                       for i in range(users.size)],
                        keys[users], int(users.size))
  if num_clients < 1 or capacity < 1:
    raise ValueError(f"need num_clients >= 1 and capacity >= 1 for k >= 2, "
                     f"got {num_clients}, {capacity}")
  client = (_hash(_CLIENT_TAG, seed, step, keys[users])
            % np.uint64(num_clients)).astype(np.int64)
  priority = _hash(_PRIORITY_TAG, seed, step, keys[users])
  order = np.lexsort((priority, client))  # by client, then priority.
  client, users = client[order], users[order]
  ids, starts = np.unique(client, return_index=True)
  ends = np.append(starts[1:], client.size)
  members = [users[a:min(b, a + capacity)] for a, b in zip(starts, ends)]
  return RoundClients(ids.astype(np.int64), members, ids.astype(np.uint64),
                      int(users.size))


@dataclasses.dataclass
class VirtualClientLoader:
  """step -> this process's share of round `step`'s virtual clients.

  Picklable (runs in grain workers); deterministic in (seed, step). See the
  module docstring for the sampling and the element layout.
  """
  source: Any
  transforms: Sequence[Any]
  sampling_rate: float
  users_per_client: int
  max_examples_per_user: int
  clients_per_chunk: int
  seed: int
  num_clients: int = 0  # G (k >= 2): num_virtual_clients(expected users, k).
  client_capacity: int = 0  # K (k >= 2); 0 = 2k. Ignored for k = 1.
  process_index: int = 0
  process_count: int = 1
  _template: dict[str, Any] | None = dataclasses.field(default=None,
                                                       repr=False)
  _keys: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    _u64(self.seed)
    _check_division(self.clients_per_chunk, self.process_count)
    self.capacity = client_capacity(self.client_capacity,
                                    self.users_per_client)
    if self.users_per_client > 1 and self.num_clients < 1:
      raise ValueError("num_clients (G) is required for users_per_client > "
                       "1: num_virtual_clients(expected users, k)")

  def clients(self, step: int) -> RoundClients:
    if self._keys is None:
      self._keys = user_keys(self.source)
    return round_clients(self._keys, self.seed, int(step),
                         self.sampling_rate, self.users_per_client,
                         self.num_clients, self.capacity)

  def _user_rows(self, user: int, step: int) -> np.ndarray:
    idx = np.asarray(self.source.user_indices(int(user)), np.int64)
    e = self.max_examples_per_user
    if idx.size > e:
      rng = transforms_lib.example_generator(
          self.seed, step, int(self._keys[int(user)]), tag=_SUBSET_TAG)
      idx = np.sort(rng.choice(idx, size=e, replace=False))
    return idx

  def __call__(self, step: int) -> dict[str, Any]:
    step = int(step)
    rc = self.clients(step)
    n = rc.ids.size
    _, slots = _process_slots(n, self.clients_per_chunk, self.process_index,
                              self.process_count)
    rows_per_client = self.capacity * self.max_examples_per_user
    rows = _RowLoader(self.source, self.transforms, self.seed)
    if self._template is None:
      self._template = pipeline.template_record(rows, len(self.source))
    per_client, ex_mask, ex_keys, sizes, ids, unit_keys = [], [], [], [], [], []
    bad_index, bad_reason = [], []
    for s in slots.reshape(-1):
      real = s < n
      members = rc.members[s] if real else np.zeros((0,), np.int64)
      idx = (np.concatenate([self._user_rows(u, step) for u in members])
             if members.size else np.zeros((0,), np.int64))
      # A record that fails to load is a padding row (example_mask 0): it
      # contributes nothing; a client with no loadable row has delta 0.
      recs, codes = pipeline.load_rows(rows, idx, step, self._template)
      recs += [self._template] * (rows_per_client - len(recs))
      per_client.append(_stack(recs))
      m = np.zeros((rows_per_client,), np.float32)
      m[:idx.size] = codes == 0
      ex_mask.append(m)
      pad = rows_per_client - idx.size
      bad_index.append(np.pad(np.where(codes > 0, idx, -1), (0, pad),
                              constant_values=-1))
      bad_reason.append(np.pad(codes, (0, pad)))
      k = np.zeros((rows_per_client, 2), np.uint32)
      k[:idx.size] = transforms_lib.example_keys(self.seed, step, idx)
      ex_keys.append(k)
      sizes.append(float(members.size))
      ids.append(int(rc.ids[s]) if real else -1)
      unit_keys.append(rc.unit_keys[s] if real else 0)
    lead = slots.shape
    example = {k: np.stack([b[k] for b in per_client]).reshape(
        lead + per_client[0][k].shape) for k in per_client[0]}
    example["rng"] = np.stack(ex_keys).reshape(lead + (rows_per_client, 2))
    example["example_mask"] = np.stack(ex_mask).reshape(
        lead + (rows_per_client,))
    example["num_users"] = np.asarray(sizes, np.float32).reshape(lead)
    h = _hash(_UNIT_TAG, self.seed, step, np.asarray(unit_keys, np.uint64))
    unit = np.stack([(h >> np.uint64(32)).astype(np.uint32),
                     (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)], -1)
    unit[np.asarray(ids) < 0] = 0
    example["unit_rng"] = unit.reshape(lead + (2,))
    return {"example": example, "mask": (slots < n).astype(np.float32),
            "user": np.asarray(ids, np.int64).reshape(lead),
            # Bad records (pipeline module doc): reported at the end only.
            "bad_index": np.stack(bad_index).reshape(
                lead + (rows_per_client,)),
            "bad_reason": np.stack(bad_reason).reshape(
                lead + (rows_per_client,)),
            "step": np.int64(step), "batch_size": np.int64(rc.num_users)}


def virtual_client_batches(source: Any, transforms: Sequence[Any], *,
                           sampling_rate: float, users_per_client: int,
                           max_examples_per_user: int, num_clients: int,
                           client_capacity: int, seed: int, num_steps: int,
                           start_step: int = 0, global_microbatch: int,
                           process_index: int = 0, process_count: int = 1,
                           num_workers: int = 0) -> pipeline.StepIterator:
  """Checkpointable iterator of rounds [start_step, num_steps).

  Signature matches `train.task.Phase.make_batches` once the source,
  transforms and the DP-FedEmb settings are bound (functools.partial);
  ``global_microbatch`` is the number of virtual clients per chunk.
  """
  loader = VirtualClientLoader(
      source, tuple(transforms), sampling_rate, users_per_client,
      max_examples_per_user, global_microbatch, seed, num_clients,
      client_capacity, process_index, process_count)
  fingerprint = {"seed": int(seed), "sampling_rate": float(sampling_rate),
                 "num_users": int(source.num_users),
                 "users_per_client": int(users_per_client),
                 "num_clients": int(num_clients),
                 "client_capacity": int(loader.capacity)}
  return pipeline.StepIterator(loader, start_step, num_steps, num_workers,
                               fingerprint=fingerprint)
