"""The adjacency suite: every data path that decides which records take part
where must join it (PRIVACY.md, "Adjacency").

Adjacency is add/remove one privacy unit. Whatever decides a record's fate
(sampled or not, partition, client, share, bad row) must leave every OTHER
record's fate unchanged in distribution when one record is added or
removed: decided per record from the record itself and secret randomness,
never from its position or from N. Deterministic paths are checked exactly
(one record added or removed: no other record's share, client or row
changes); random ones statistically over many secret seeds (every position
joins a step with the same probability q, independently; the "alternating
records" distinguisher finds no gap beyond one record's contribution).
The seeds below stand in for secret ones; they are fixed so that the
statistical bounds are checked deterministically.
"""

import numpy as np
import pytest
from scipy import stats

from dpjax.data import BadRecord
from dpjax.data import bad_records
from dpjax.data import clients
from dpjax.data import pipeline
from dpjax.data import splits
from dpjax.data import users as users_lib
from dpjax.prepare import dedup
from dpjax.prepare import plan as prepare_plan
from dpjax.privacy import sampling

# Stand-ins for secret seeds: 64-bit, drawn once from a fixed generator.
_SEEDS = [int(s) for s in
          np.random.default_rng(2024).integers(0, 2**63, size=6000)]


class _Records:
  """Source of n records; record i is {"x": i}."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= int(i) < self.n:
      raise IndexError(i)
    return {"x": np.int64(i)}


def _loader(bands: int):
  def draw(seed, step, n, q):
    return pipeline.StepLoader(_Records(n), (), q, 8, seed=seed,
                               sampler=sampling.Cyclic(bands)).indices(step)
  return draw


# name -> (sampler(seed, step, N, q) -> sorted indices, b): every
# example-level sampler of dpjax, directly and through the StepLoader.
SAMPLERS = {
    "poisson": (sampling.sample_indices, 1),
    "poisson_loader": (_loader(1), 1),
    "cyclic_b2": (lambda s, t, n, q: sampling.sample_cyclic_indices(
        s, t, n, q, 2), 2),
    "cyclic_b4": (lambda s, t, n, q: sampling.sample_cyclic_indices(
        s, t, n, q, 4), 4),
    "cyclic_loader_b2": (_loader(2), 2),
}


def _inclusion(sampler, step: int, n: int, q: float,
               seeds=_SEEDS) -> np.ndarray:
  """bool[len(seeds), n]: which positions join `step`, seed by seed."""
  x = np.zeros((len(seeds), n), bool)
  for row, seed in zip(x, seeds):
    row[sampler(seed, step, n, q)] = True
  return x


def _assert_every_position_joins_with_probability(x: np.ndarray, q: float,
                                                  positions) -> None:
  """Each listed column of x ~ Bernoulli(q) over seeds: every count within
  5 sd, chi-square over positions, and odd / even positions alike."""
  s = x.shape[0]
  counts = x[:, positions].sum(0)
  sd = np.sqrt(s * q * (1 - q))
  assert np.all(np.abs(counts - s * q) < 5 * sd), counts
  chi2 = np.sum((counts - s * q) ** 2) / sd ** 2
  assert stats.chi2.sf(chi2, df=len(counts)) > 1e-6
  group_sd = np.sqrt(q * (1 - q) / (s * len(counts) / 2))
  for parity in (0, 1):
    rate = x[:, [p for p in positions if p % 2 == parity]].mean()
    assert abs(rate - q) < 5 * group_sd, (parity, rate)


def _assert_independent(x: np.ndarray, q: float, positions) -> None:
  """Columns of x independent: batch-size variance n q (1 - q) (a fixed
  batch size or any global dependence breaks it) and every pairwise
  correlation within 5.5 / sqrt(S) of 0 (local dependence)."""
  s, cols = x.shape[0], x[:, positions].astype(np.float64)
  size_var = cols.sum(1).var() / (len(positions) * q * (1 - q))
  assert abs(size_var - 1) < 0.12, size_var
  m = cols.mean(0)
  corr = (cols.T @ cols / s - np.outer(m, m)) / (q * (1 - q))
  off = corr[~np.eye(len(positions), dtype=bool)]
  assert np.abs(off).max() < 5.5 / np.sqrt(s), np.abs(off).max()


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("step", [0, 1])
def test_every_position_joins_every_step_with_probability_q(name, step):
  """Over secret seeds every position joins step t with probability q, odd
  positions as often as even ones (at b = 2 the old rule i mod b never put
  1, 3, 5, ... in step 0), independently of the other positions."""
  sampler, _ = SAMPLERS[name]
  n, q = 48, 0.05
  x = _inclusion(sampler, step, n, q)
  _assert_every_position_joins_with_probability(x, q, range(n))
  _assert_independent(x, q, range(n))


@pytest.mark.parametrize("name", SAMPLERS)
def test_alternating_records_distinguisher_finds_no_gap(name):
  """Records +1 at even positions and -1 at odd ones; D' = D minus its
  first record. Over secret seeds the step-t sums of D and D' differ in
  mean by at most one record's contribution (q b; it is q) plus sampling
  error, and their distributions agree (KS). With partitions i mod b the
  means were +qN and -qN (a gap of 2 q N = 40 here)."""
  sampler, b = SAMPLERS[name]
  n, q = 2000, 0.01
  d = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
  neighbour = d[1:]
  seeds_d, seeds_n = _SEEDS[:2500], _SEEDS[2500:5000]
  for step in (0, 1):
    s_d = np.array([d[sampler(s, step, n, q)].sum() for s in seeds_d])
    s_n = np.array([neighbour[sampler(s, step, n - 1, q)].sum()
                    for s in seeds_n])
    se = np.sqrt(s_d.var() / s_d.size + s_n.var() / s_n.size)
    gap = abs(s_d.mean() - s_n.mean())
    assert gap <= q * b + 5 * se, (step, gap, se)
    assert stats.ks_2samp(s_d, s_n).pvalue > 1e-4


@pytest.mark.parametrize("bands", [1, 2])
def test_canaries_are_sampled_like_any_record(bands):
  """Canaries appended after the data (`splits.Appended`, as
  `train.canaries.insert` does) are ordinary positions: over secret seeds
  each joins a step with probability q, independently of each other and of
  the data's records; the loader's rows at their positions are them."""
  n, m, q = 40, 8, 0.05
  source = splits.Appended(_Records(n), [{"x": np.int64(-1 - j)}
                                         for j in range(m)])
  loader = lambda seed: pipeline.StepLoader(
      source, (), q, 8, seed=seed, sampler=sampling.Cyclic(bands))
  x = _inclusion(lambda s, t, _n, _q: loader(s).indices(t), 0, n + m, q)
  positions = list(range(n - m, n + m))  # m records, then the m canaries.
  _assert_every_position_joins_with_probability(x, q, positions)
  _assert_independent(x, q, positions)
  # The batch rows at canary positions are the canaries' own records.
  seed = next(s for s, row in zip(_SEEDS, x) if row[n:].any())
  batch = loader(seed)(0)
  rows = batch["example"]["x"].reshape(-1)[batch["mask"].reshape(-1) == 1]
  want = [source[i]["x"] for i in loader(seed).indices(0)]
  np.testing.assert_array_equal(rows, want)
  assert (rows < 0).any()


class _Users:
  """Minimal user-keyed source: user u owns record u, stable key keys[u]."""

  def __init__(self, keys):
    self.user_keys = np.asarray(keys, np.uint64)
    self.num_users = len(keys)

  def __len__(self):
    return self.num_users

  def __getitem__(self, i):
    return {"image": np.zeros((2, 2, 3), np.uint8), "label": int(i)}

  def user_indices(self, u):
    return np.array([u])


_KEYS = np.random.default_rng(7).choice(2**62, size=300, replace=False
                                        ).astype(np.uint64)
_NEW_KEY = np.uint64(2**62 + 5)  # Distinct from every key above.


def _neighbours():
  """(name, keys of D', the key added or removed) for D = _KEYS."""
  return [("add_first", np.concatenate([[_NEW_KEY], _KEYS]), _NEW_KEY),
          ("add_last", np.concatenate([_KEYS, [_NEW_KEY]]), _NEW_KEY),
          ("remove", np.delete(_KEYS, 137), _KEYS[137])]


def _sampled_keys(keys, seed, step, q) -> set:
  return set(keys[clients.sampled_users(keys, seed, step, q)].tolist())


@pytest.mark.parametrize("neighbour", range(3))
def test_fedemb_user_inclusion_is_decided_per_user(neighbour):
  """Exact: with the same secret seed, adding or removing one user leaves
  every other user's inclusion unchanged; over secret seeds each user is
  included with probability q."""
  _, other, changed = _neighbours()[neighbour]
  q = 0.2
  for seed in _SEEDS[:30]:
    for step in range(3):
      a = _sampled_keys(_KEYS, seed, step, q)
      b = _sampled_keys(other, seed, step, q)
      assert a - {int(changed)} == b - {int(changed)}
  x = np.stack([np.isin(_KEYS[:40], list(_sampled_keys(_KEYS, s, 0, q)))
                for s in _SEEDS[:3000]])
  _assert_every_position_joins_with_probability(x, q, range(40))


def _contents(keys, seed, step, q, k, g, capacity) -> dict:
  """client id -> tuple of member keys (priority order)."""
  rc = clients.round_clients(keys, seed, step, q, k, g, capacity)
  return {int(c): tuple(keys[m].tolist()) for c, m in zip(rc.ids, rc.members)}


@pytest.mark.parametrize("neighbour", range(3))
def test_fedemb_client_content_is_a_function_of_its_hashed_set(neighbour):
  """Virtual clients (k = 4, capacity 4, small G so the capacity binds).
  What holds exactly, with the same secret seed: every other user's client
  is unchanged, and a client's content is its hashed set's K best
  priorities -- a function of that set only. So adding or removing user u
  changes only u's client, where u may displace (or, removed, readmit) the
  lowest-priority member; no other client moves."""
  _, other, changed = _neighbours()[neighbour]
  q, k, g, cap, big = 0.5, 4, 30, 4, 10**6
  displaced = 0
  for seed in _SEEDS[:40]:
    for step in range(2):
      full = [_contents(keys, seed, step, q, k, g, big)
              for keys in (_KEYS, other)]
      kept = [_contents(keys, seed, step, q, k, g, cap)
              for keys in (_KEYS, other)]
      # Uncapped: u's presence only adds / removes u from its own client.
      strip = lambda c: {i: tuple(v for v in m if v != int(changed))
                         for i, m in c.items()}
      assert ({i: m for i, m in strip(full[0]).items() if m} ==
              {i: m for i, m in strip(full[1]).items() if m})
      for f, c in zip(full, kept):  # Capped: the K best of the hashed set.
        assert c == {i: m[:cap] for i, m in f.items()}
      changed_clients = {i for i in kept[0].keys() | kept[1].keys()
                         if kept[0].get(i) != kept[1].get(i)}
      assert len(changed_clients) <= 1
      for i in changed_clients:  # u's client.
        with_u, without_u = sorted((kept[0].get(i, ()), kept[1].get(i, ())),
                                   key=lambda m: int(changed) in m)[::-1]
        assert int(changed) in with_u and int(changed) not in without_u
        out = set(without_u) - set(with_u)
        if out:  # u took the place of the lowest-priority member.
          assert out == {without_u[-1]} and len(without_u) == cap
          displaced += 1
  assert displaced > 0  # The capacity case was exercised.


@pytest.mark.parametrize("neighbour", range(3))
def test_fedemb_one_user_per_client_is_per_user(neighbour):
  """k = 1: each sampled user is its own client keyed by its stable key;
  one user added or removed leaves every other client as it was."""
  _, other, changed = _neighbours()[neighbour]
  for seed in _SEEDS[:20]:
    a = clients.round_clients(_KEYS, seed, 0, 0.2, 1, 0, 1)
    b = clients.round_clients(other, seed, 0, 0.2, 1, 0, 1)
    ua = set(a.unit_keys.tolist()) - {int(changed)}
    ub = set(b.unit_keys.tolist()) - {int(changed)}
    assert ua == ub


def test_canary_users_are_sampled_like_any_user():
  """User-level canaries (`users.AppendedUsers`): appending them changes no
  existing user's inclusion (same seed), and each is included with
  probability q over secret seeds."""
  base = _Users(_KEYS[:50])
  canary = {"images": [np.ones((2, 2, 3), np.uint8)], "label": 0}
  appended = users_lib.AppendedUsers(base, [canary] * 10)
  keys = users_lib.user_keys(appended)
  q = 0.2
  for seed in _SEEDS[:30]:
    assert (_sampled_keys(keys, seed, 0, q) & set(_KEYS[:50].tolist()) ==
            _sampled_keys(users_lib.user_keys(base), seed, 0, q))
  x = np.stack([np.isin(keys, list(_sampled_keys(keys, s, 0, q)))
                for s in _SEEDS[:3000]])
  _assert_every_position_joins_with_probability(x, q, range(40, 60))


def test_heldout_users_are_decided_per_user():
  """The public hold-out rule reads the user id only."""
  ids = [f"writer{i}" for i in range(500)]
  held = {u for u in ids if users_lib.is_heldout_user(u, 0.1)}
  held2 = {u for u in ["new"] + ids[1:] if users_lib.is_heldout_user(u, 0.1)}
  assert held - {ids[0]} == held2 - {"new"}
  assert 20 < len(held) < 80


class _FlakySource:
  """Records of a list; reading one marked unreadable raises OSError."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    rec = self.records[int(i)]
    if rec["kind"] == "unreadable":
      raise OSError(f"cannot read {rec['id']}")
    return rec


def _decode(rec):
  if rec["kind"] == "corrupt":
    raise BadRecord("decode", "corrupt")
  return {"x": np.int64(rec["id"])}


def _bad_rows(records, step: int) -> dict:
  """record id -> reason code (0 = good) through the training row path and
  the start-up validation."""
  source = _FlakySource(records)
  rows = pipeline.RowLoader(source, (_decode,), 3)
  template = pipeline.template_record(rows, len(source))
  _, codes = pipeline.load_rows(rows, np.arange(len(source)), step, template)
  startup = {i: c for i, c, _ in bad_records.find_bad_records(
      source, (_decode,), num_threads=1)}
  assert startup == {i: c for i, c in enumerate(codes.tolist()) if c}
  return {r["id"]: int(c) for r, c in zip(records, codes)}


def test_bad_rows_depend_only_on_the_record():
  """Exact: whether a row is bad (and why) is a function of that record;
  adding a bad record first or removing one changes no other row's
  status."""
  kinds = ("ok", "corrupt", "ok", "unreadable", "ok")
  records = [{"id": i, "kind": kinds[(i * 7) % 5]} for i in range(60)]
  base = _bad_rows(records, step=2)
  assert len(set(base.values())) == 3  # Good, decode and read failures.
  for other, changed in (([{"id": -1, "kind": "corrupt"}] + records, -1),
                         (records[1:], 0), (records[:30] + records[31:], 30)):
    got = _bad_rows(other, step=2)
    assert {i: c for i, c in got.items() if i != changed} == {
        i: c for i, c in base.items() if i != changed}


def _split_contents(source, fraction, seed) -> tuple[set, set]:
  public, private = splits.public_private_split(source, fraction, seed)
  key = lambda r: (int(r["label"]), r["image"].tobytes())
  return ({key(public[i]) for i in range(len(public))},
          {key(private[i]) for i in range(len(private))})


def test_continual_public_private_split_is_decided_per_record():
  """Exact: DP continual's split puts each record in a share by the record
  (its key or bytes) and the split seed only: inserting one record first
  and appending one last moves no other record between the shares."""
  rec = lambda i: {"image": np.full((2, 2), i % 256, np.uint8),
                   "label": i}
  records = [rec(i) for i in range(2000)]
  new_first, new_last = rec(5000), rec(5001)
  pub, priv = _split_contents(records, 0.1, seed=3)
  assert 100 < len(pub) < 300 and len(pub) + len(priv) == 2000
  pub2, priv2 = _split_contents([new_first] + records + [new_last], 0.1, 3)
  new = {(5000, new_first["image"].tobytes()),
         (5001, new_last["image"].tobytes())}
  assert pub2 - new == pub and priv2 - new == priv


def _kept(exact: np.ndarray, near: np.ndarray, ids: list[int],
          threshold: int) -> dict[int, bool]:
  reason, _ = prepare_plan.duplicates(exact, near, "near", threshold)
  return {i: not r for i, r in zip(ids, reason.tolist())}


@pytest.mark.parametrize("position", [0, 17, 40])
def test_near_dedup_changes_only_the_added_records_duplicates(position):
  """Exact: `python -m dpjax.prepare --dedup=near` keeps or drops a record
  by the records within the threshold of it, so inserting one record
  anywhere changes the fate of none but its own near duplicates (the old
  greedy rule, "near an earlier KEPT record", fails: in a chain a~b~c,
  adding a drops b, which keeps c)."""
  rng = np.random.default_rng(position)
  threshold, n = 4, 80
  # Chains of near duplicates: each hash flips 3 bits of the previous one.
  near, h = [], 0
  for i in range(n):
    h = (int(rng.integers(0, 2 ** 63)) if i % 4 == 0 else
         h ^ sum(1 << int(b) for b in rng.choice(64, 3, replace=False)))
    near.append(h)
  exact = rng.integers(0, 256, (n + 1, 16), dtype=np.uint8)
  exact[5] = exact[6]  # One exact pair.
  ids = list(range(n))
  base = _kept(exact[:n], np.asarray(near, np.uint64), ids, threshold)
  assert 0 < sum(base.values()) < n
  new = near[position + 1] ^ 1 if position + 1 < n else 0
  other_near = np.asarray(near[:position] + [new] + near[position:], np.uint64)
  other_exact = np.concatenate([exact[:position], exact[n:], exact[position:n]])
  got = _kept(other_exact, other_near, ids[:position] + [-1] + ids[position:],
              threshold)
  close = {i for i in ids if dedup.hamming(near[i], new) <= threshold}
  assert close  # The added record has near duplicates ...
  changed = {i for i in ids if got[i] != base[i]}
  assert changed <= close  # ... and only they may change.
