"""User-level sampling into virtual clients (DP-FedEmb): one round's batch.

`VirtualClientLoader` / `virtual_client_batches` produce, for each round,
the virtual clients of the Poisson-sampled users of a user-keyed source
(`data.users`: `num_users`, `user_indices(u)`, stable `user_keys`). With
one user per client this is plain user-level Poisson sampling.

Sampling (the accounted mechanism). Round t, secret sampling seed s, public
sampling rate q, public number of virtual clients G, public capacity K:
  1. Inclusion: user u (stable key key_u) takes part iff
     H(SAMPLE, s, t, key_u) < q (a keyed hash read as a uniform in [0, 1),
     rounded so that the probability is <= q): Poisson sampling of USERS,
     each independently with probability q, expected q*N users -- the same
     distribution as `sampling.sample_indices`,
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
import math
from typing import Any, Sequence

import numpy as np

from dpjax.data import pipeline
from dpjax.data import transforms as transforms_lib
from dpjax.data import users as users_lib

_SAMPLE_TAG = 0xFEDE10
_CLIENT_TAG = 0xFEDE11
_SUBSET_TAG = 0xFEDE12
_UNIT_TAG = 0xFEDE13
_PRIORITY_TAG = 0xFEDE14

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
  h = users_lib.keyed_hash(_SAMPLE_TAG, seed, step, keys)
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
    keys: uint64[N] distinct stable user keys (`users_lib.user_keys(source)`).
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
  client = (users_lib.keyed_hash(_CLIENT_TAG, seed, step, keys[users])
            % np.uint64(num_clients)).astype(np.int64)
  priority = users_lib.keyed_hash(_PRIORITY_TAG, seed, step, keys[users])
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
  seed: int = dataclasses.field(repr=False)  # Secret: never printed.
  num_clients: int = 0  # G (k >= 2): num_virtual_clients(expected users, k).
  client_capacity: int = 0  # K (k >= 2); 0 = 2k. Ignored for k = 1.
  process_index: int = 0
  process_count: int = 1
  _template: dict[str, Any] | None = dataclasses.field(default=None,
                                                       repr=False)
  _keys: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    users_lib.check_u64(self.seed)
    pipeline.check_division(self.clients_per_chunk, self.process_count)
    self.capacity = client_capacity(self.client_capacity,
                                    self.users_per_client)
    if self.users_per_client > 1 and self.num_clients < 1:
      raise ValueError("num_clients (G) is required for users_per_client > "
                       "1: num_virtual_clients(expected users, k)")

  def clients(self, step: int) -> RoundClients:
    if self._keys is None:
      self._keys = users_lib.user_keys(self.source)
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
    _, slots = pipeline.process_slots(n, self.clients_per_chunk,
                                      self.process_index, self.process_count)
    rows_per_client = self.capacity * self.max_examples_per_user
    rows = pipeline.RowLoader(self.source, self.transforms, self.seed)
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
      per_client.append(pipeline.stack_records(recs))
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
    h = users_lib.keyed_hash(_UNIT_TAG, self.seed, step,
                             np.asarray(unit_keys, np.uint64))
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
