"""The global plan of ``python -m dpjax.prepare``: which staged records are
kept, in which output order, in which output shards. Pure numpy, no I/O.

Staged records have global ids 0..M-1 in visiting order (input shard, then
position in it), the order in which "keep the first" is decided, so the
outcome does not depend on how many workers staged them or in what order
they finished.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np

from dpjax.prepare import dedup

DEDUP_MODES = ("exact", "near", "none")
DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate")  # Codes 1, 2.


@dataclasses.dataclass
class Plan:
  """Attributes:
    order: int64[N] staged ids of the kept records, in output order.
    reason: int8[M] 0 = kept, else 1 + index in ``DUPLICATE_REASONS``.
    dup_of: int64[M] staged id of the kept record a duplicate repeats
      (-1 for kept records).
    users: (ids, starts, stops) output ranges per user, or None.
  """
  order: np.ndarray
  reason: np.ndarray
  dup_of: np.ndarray
  users: tuple[list[Any], np.ndarray, np.ndarray] | None

  def output_index(self) -> np.ndarray:
    """int64[M]: each staged id's output index (-1 if dropped)."""
    out = np.full(self.reason.shape, -1, np.int64)
    out[self.order] = np.arange(self.order.size)
    return out


def duplicates(exact: np.ndarray, near: np.ndarray, mode: str,
               threshold: int) -> tuple[np.ndarray, np.ndarray]:
  """(reason int8[M], dup_of int64[M]); see ``Plan``.

  "exact": equal pixel hashes, the first kept. "near": also drops a record
  whose dHash is within ``threshold`` bits of ANY earlier record's (kept or
  not), so a chain a~b~c with a, c far apart keeps only a. A record's fate
  thus depends only on the records within the threshold of it: adding or
  removing one record changes only its own near duplicates (greedy "earlier
  KEPT record" would cascade: adding a drops b, which keeps c).
  ``dup_of`` points at the kept record a duplicate (transitively) repeats.
  """
  if mode not in DEDUP_MODES:
    raise ValueError(f"--dedup={mode!r}: use one of {DEDUP_MODES}.")
  m = len(near)
  reason = np.zeros((m,), np.int8)
  dup_of = np.full((m,), -1, np.int64)
  if mode == "none":
    return reason, dup_of
  first = dedup.keep_first_exact(exact)
  is_exact = first != np.arange(m)
  reason[is_exact], dup_of[is_exact] = 1, first[is_exact]
  if mode == "near":
    index, seen = dedup.NearIndex(threshold), []
    for i in np.flatnonzero(~is_exact):
      j = index.find(int(near[i]))
      if j >= 0:
        reason[i], dup_of[i] = 2, seen[j]
      index.add(int(near[i]))
      seen.append(int(i))
    # dup_of[i] < i, so in visiting order its own target is already kept.
    for i in np.flatnonzero(reason):
      if reason[dup_of[i]]:
        dup_of[i] = dup_of[dup_of[i]]
  return reason, dup_of


def make_plan(exact: np.ndarray, near: np.ndarray,
              users: Sequence[Any] | None, mode: str,
              threshold: int) -> Plan:
  """Dedup, then order: visiting order, or grouped by user.

  User-keyed: users in ``str(id)`` order (the order ``UserKeyedSource``
  numbers users in), each user's records contiguous, in visiting order.
  """
  reason, dup_of = duplicates(exact, near, mode, threshold)
  kept = np.flatnonzero(reason == 0).astype(np.int64)
  if users is None:
    return Plan(kept, reason, dup_of, None)
  names = np.asarray([str(users[i]) for i in kept], dtype=object)
  order = kept[np.argsort(names, kind="stable")]
  sorted_names = names[np.argsort(names, kind="stable")]
  _, starts = np.unique(sorted_names, return_index=True)
  starts = np.sort(starts).astype(np.int64)
  stops = np.append(starts[1:], order.size).astype(np.int64)
  ids = [users[order[s]] for s in starts]
  return Plan(order, reason, dup_of, (ids, starts, stops))


def shard_bounds(n: int, records_per_shard: int) -> list[tuple[int, int]]:
  """[start, stop) of each output shard: full shards, then the rest."""
  if records_per_shard < 1:
    raise ValueError(f"--records_per_shard={records_per_shard}: use >= 1.")
  return [(a, min(a + records_per_shard, n))
          for a in range(0, n, records_per_shard)]
