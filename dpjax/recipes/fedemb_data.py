"""User-partitioned data for DP-FedEmb: user-keyed sources, virtual clients.

`UserKeyedSource` gives any record source (TFDS, ArrayRecord, ...) the
`num_users` / `user_indices(u)` interface of `synthetic.Identities`, from a
user field (e.g. an EMNIST writer id). `VirtualClientLoader` produces one
round's batch of virtual clients for the training loop:

Sampling (the accounted mechanism). Round t partitions the user ids [0, N)
into ceil(N/k) groups of k with a random permutation drawn from (seed, t)
only (never from data), and Poisson-samples GROUPS at rate q: each group,
hence each user, takes part independently of everything else with
probability q, and the expected number of users is q*N. Removing one user
changes only its own group's data. With k = 1 this is exactly
`pipeline.sample_users` (Poisson over users). The privacy analysis: for any
user u, conditioned on the other groups, the round is a Poisson-subsampled
Gaussian mechanism at rate q whose sensitivity is the bound on how much u
can move its group's clipped delta (C for k = 1; 2 * unit clip = C for
k >= 2, see `privacy.user_level.unit_clip_norm`).

Element layout (this process p of P; M = virtual clients per chunk):
  {"example": {"image": [n_chunks, M/P, k*E, ...], "label": [.., k*E],
               "rng": uint32[.., k*E, 2], "example_mask": [.., k*E],
               "num_users": float32[n_chunks, M/P], "unit_rng": uint32[.., 2]},
   "mask": float32[n_chunks, M/P] (virtual client is real),
   "user": int64[n_chunks, M/P] (group id, -1 = padding),
   "step", "batch_size" (sampled users; a logged metric only)}.
Each user contributes at most E = max_examples_per_user examples (a uniform
subset from (seed, t, user) when it has more).
"""

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from dpjax.data import pipeline
from dpjax.data import transforms as transforms_lib
from dpjax.privacy import sampling

_PERM_TAG = 0xFEDE11
_SUBSET_TAG = 0xFEDE12
_UNIT_TAG = 0xFEDE13


class UserKeyedSource:
  """A record source indexed by a user field (one pass over the source).

  Args:
    source: random-access source of dicts.
    user_key: field holding the user id (any hashable value).
    label_key: field holding the class / identity label (for filtering).
    label_range: keep only records with label in [lo, hi) (e.g. EMNIST
      trains on classes 0-35); None keeps all.
  """

  def __init__(self, source: Any, user_key: str, label_key: str = "label",
               label_range: Sequence[int] | None = None):
    self.source = source
    users: dict[Any, list[int]] = {}
    for i in range(len(source)):
      rec = source[i]
      if label_range is not None and not (
          label_range[0] <= int(rec[label_key]) < label_range[1]):
        continue
      u = rec[user_key]
      users.setdefault(u.item() if hasattr(u, "item") else u, []).append(i)
    self._index = [np.asarray(v, np.int64) for _, v in sorted(
        users.items(), key=lambda kv: str(kv[0]))]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(index)]

  @property
  def num_users(self) -> int:
    return len(self._index)

  def user_indices(self, user: int) -> np.ndarray:
    return self._index[int(user)]


class AppendedUsers:
  """A user source followed by extra users (e.g. audit canary users).

  ``users[j]`` is a dict with "images" (a sequence of E images) and any
  other fields shared by that user's records (e.g. its label). User
  ``num_users_of(source) + j`` owns E new records appended after the
  source's; each is an ordinary user: sampled, clipped, noised, counted.
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


@dataclasses.dataclass
class _RoundGroups:
  """Round t's partition of user ids into groups of k, as a user source."""
  source: Any
  users_per_client: int
  max_examples_per_user: int
  seed: int
  step: int

  def __post_init__(self):
    n, k = self.source.num_users, self.users_per_client
    self._perm = (np.arange(n) if k == 1 else np.random.default_rng(
        [self.seed, self.step, _PERM_TAG]).permutation(n))
    self.num_users = math.ceil(n / k)  # Groups play the role of users.

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(index)]

  def members(self, group: int) -> np.ndarray:
    k = self.users_per_client
    return self._perm[group * k:(group + 1) * k]

  def user_indices(self, group: int) -> np.ndarray:
    out = []
    for u in self.members(group):
      idx = np.asarray(self.source.user_indices(int(u)), np.int64)
      e = self.max_examples_per_user
      if idx.size > e:
        rng = transforms_lib.example_generator(self.seed, self.step, int(u),
                                               tag=_SUBSET_TAG)
        idx = np.sort(rng.choice(idx, size=e, replace=False))
      out.append(idx)
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


@dataclasses.dataclass
class VirtualClientLoader:
  """step -> this process's share of round `step`'s virtual clients.

  Picklable (runs in grain workers). See the module docstring.
  """
  source: Any
  transforms: Sequence[Any]
  sampling_rate: float
  users_per_client: int
  max_examples_per_user: int
  clients_per_chunk: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __call__(self, step: int) -> dict[str, Any]:
    step = int(step)
    groups = _RoundGroups(self.source, self.users_per_client,
                          self.max_examples_per_user, self.seed, step)
    k, e = self.users_per_client, self.max_examples_per_user
    out = pipeline.UserStepLoader(
        groups, tuple(self.transforms), self.sampling_rate,
        self.clients_per_chunk, k * e, self.seed, self.process_index,
        self.process_count)(step)
    gid = out["user"]
    sizes = np.array([groups.members(int(g)).size if g >= 0 else 0
                      for g in gid.reshape(-1)], np.float32)
    unit = transforms_lib.example_keys(
        self.seed ^ _UNIT_TAG, step, np.maximum(gid.reshape(-1), 0))
    unit[gid.reshape(-1) < 0] = 0
    ex = dict(out["example"])
    ex["example_mask"] = out.pop("example_mask")
    ex["num_users"] = sizes.reshape(gid.shape)
    ex["unit_rng"] = unit.reshape(gid.shape + (2,))
    out["example"] = ex
    total = sum(groups.members(int(g)).size for g in sampling.sample_indices(
        self.seed, step, groups.num_users, self.sampling_rate))
    out["batch_size"] = np.int64(total)
    return out


def virtual_client_batches(source: Any, transforms: Sequence[Any], *,
                           sampling_rate: float, users_per_client: int,
                           max_examples_per_user: int, seed: int,
                           num_steps: int, start_step: int = 0,
                           global_microbatch: int, process_index: int = 0,
                           process_count: int = 1, num_workers: int = 0
                           ) -> pipeline.StepIterator:
  """Checkpointable iterator of rounds [start_step, num_steps).

  Signature matches `train.task.Phase.make_batches` once the source,
  transforms and the DP-FedEmb settings are bound (functools.partial);
  ``global_microbatch`` is the number of virtual clients per chunk.
  """
  loader = VirtualClientLoader(
      source, tuple(transforms), sampling_rate, users_per_client,
      max_examples_per_user, global_microbatch, seed, process_index,
      process_count)
  fingerprint = {"seed": int(seed), "sampling_rate": float(sampling_rate),
                 "num_users": int(source.num_users),
                 "users_per_client": int(users_per_client)}
  return pipeline.StepIterator(loader, start_step, num_steps, num_workers,
                               fingerprint=fingerprint)
