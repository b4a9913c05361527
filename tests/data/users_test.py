"""DP-FedEmb virtual clients: per-user keyed sampling and grouping."""

import pickle

import numpy as np
import pytest

from dpjax.data import clients
from dpjax.data import users as users_lib

SEED = 2**64 - 1  # The loop passes secret 64-bit seeds.


def _records(num_users=60, per_user=3):
  """Records of users with ids 1000 + j (label j, row = record index),
  interleaved so that a user's rows are not contiguous."""
  recs = []
  for i in range(num_users * per_user):
    j = (i * 7) % num_users
    recs.append({"image": np.full((2, 2, 3), j % 256, np.uint8),
                 "label": j, "user": 1000 + j, "row": i})
  return recs


def _loader(source, k=4, capacity=0, expected=20, seed=SEED, micro=4, e=2):
  # q is a fixed public rate: the same for neighbouring populations.
  return clients.VirtualClientLoader(
      source, (), sampling_rate=expected / 60,
      users_per_client=k, max_examples_per_user=e, clients_per_chunk=micro,
      seed=seed, num_clients=clients.num_virtual_clients(expected, k),
      client_capacity=capacity)


def _clients(loader, step):
  """{client id: (sorted user ids, sorted record rows)} of round `step`."""
  el = loader(step)
  ex = el["example"]
  lead = el["mask"].shape
  out = {}
  for s in zip(*np.nonzero(el["mask"])):
    real = ex["example_mask"][s] > 0
    users = tuple(sorted(set((ex["label"][s][real] + 1000).tolist())))
    assert len(users) == int(ex["num_users"][s])
    out[int(el["user"][s])] = (users, tuple(sorted(ex["row"][s][real])))
  assert len(out) == int(el["mask"].sum())
  assert lead[1] == loader.clients_per_chunk
  return out


# capacity 0 = 2k (rare overflow) and k (frequent overflow).
@pytest.mark.parametrize("capacity", [0, 4])
def test_removing_one_user_changes_exactly_one_client(capacity):
  recs = _records()
  full = users_lib.UserKeyedSource(recs, "user")
  checked = 0
  for step in range(6):
    base = _clients(_loader(full, capacity=capacity), step)
    assert base, "no client sampled"
    client, (users, _) = sorted(base.items())[step % len(base)]
    gone = users[0]
    less = users_lib.UserKeyedSource(recs, "user",
                                       keep_user=lambda u, g=gone: u != g)
    assert less.num_users == full.num_users - 1
    other = _clients(_loader(less, capacity=capacity), step)
    differ = {c for c in set(base) | set(other)
              if base.get(c) != other.get(c)}
    assert differ == {client}  # Only the removed user's client changed.
    assert gone not in other.get(client, ((), ()))[0]
    checked += 1
    # Adding back a user that was not sampled changes nothing at all.
    unsampled = next(1000 + j for j in range(60) if all(
        1000 + j not in u for u, _ in base.values()))
    less = users_lib.UserKeyedSource(
        recs, "user", keep_user=lambda u, g=unsampled: u != g)
    assert _clients(_loader(less, capacity=capacity), step) == base
  assert checked == 6


def test_overflow_keeps_capacity_users_by_keyed_priority():
  keys = users_lib.user_keys(users_lib.UserKeyedSource(_records(), "user"))
  for step in range(20):
    rc = clients.round_clients(keys, SEED, step, 0.5, 10, 3, 4)
    allc = clients.round_clients(keys, SEED, step, 0.5, 10, 3, 100)
    assert rc.num_sampled == allc.num_sampled == allc.num_users
    for members, every in zip(rc.members, allc.members):
      assert members.size == min(4, every.size)
      np.testing.assert_array_equal(members, every[:4])  # priority order.
    assert max(m.size for m in allc.members) > 4  # overflow happened.


def test_inclusion_is_poisson_at_rate_q_and_clients_partition_the_sample():
  n, q, rounds = 100, 0.1, 2000
  keys = users_lib.user_keys(
      users_lib.UserKeyedSource(_records(n, 1), "user"))
  counts = np.zeros(n)
  for step in range(rounds):
    users = clients.sampled_users(keys, SEED, step, q)
    counts[users] += 1
    if step < 50:
      rc = clients.round_clients(keys, SEED, step, q, 4, 3, 10**6)
      flat = np.concatenate(rc.members)
      assert sorted(flat.tolist()) == users.tolist()  # disjoint, complete.
      assert set(rc.ids.tolist()) <= {0, 1, 2}
  freq = counts / rounds  # Binomial(2000, 0.1)/2000: sd 0.0067 per user.
  assert abs(freq.mean() - q) < 0.005
  assert np.all(np.abs(freq - q) < 0.04)
  assert clients.sampled_users(keys, SEED, 0, 1.0).size == n
  assert clients.sampled_users(keys, SEED, 0, 0.0).size == 0


def test_k1_clients_are_the_sampled_users_alone():
  src = users_lib.UserKeyedSource(_records(), "user")
  loader = _loader(src, k=1, expected=12)
  for step in range(3):
    users = clients.sampled_users(src.user_keys, SEED, step, 12 / 60)
    el = loader(step)
    real = el["mask"] > 0
    assert sorted(el["user"][real].tolist()) == users.tolist()
    assert np.all(el["example"]["num_users"][real] == 1)
    assert el["example"]["label"].shape[-1] == 2  # capacity 1: E rows.
    for s in zip(*np.nonzero(real)):
      u = int(el["user"][s])
      assert set(el["example"]["label"][s].tolist()) == {src.user_id(u) - 1000}
    # Inclusion does not depend on k: the k = 4 round has the same users.
    rc = _loader(src, k=4, expected=12).clients(step)
    assert sorted(np.concatenate(rc.members).tolist()) == users.tolist()


def test_num_clients_comes_from_config_not_population():
  assert clients.num_virtual_clients(320, 8) == 40
  assert clients.num_virtual_clients(30, 4) == 8
  assert clients.client_capacity(0, 8) == 16
  assert clients.client_capacity(5, 8) == 5
  assert clients.client_capacity(0, 1) == 1
  recs = _records()
  for n_keep in (60, 59):
    src = users_lib.UserKeyedSource(
        recs, "user", keep_user=lambda u, n=n_keep: u < 1000 + n)
    it = clients.virtual_client_batches(
        src, (), sampling_rate=20 / 60, users_per_client=4,
        max_examples_per_user=2, num_clients=5, client_capacity=0,
        seed=SEED, num_steps=3, global_microbatch=4)
    assert it.get_state()["num_clients"] == 5
    assert all(np.all(el["user"] < 5) for el in it)


def test_loader_is_picklable_deterministic_and_seeded():
  src = users_lib.UserKeyedSource(_records(), "user")
  loader = _loader(src)
  a = loader(3)
  b = pickle.loads(pickle.dumps(loader))(3)
  for x, y in ((a, b), (a, _loader(src)(3))):
    np.testing.assert_array_equal(x["user"], y["user"])
    for k in a["example"]:
      np.testing.assert_array_equal(x["example"][k], y["example"][k])
  assert _clients(loader, 3) != _clients(_loader(src, seed=7), 3)
  with pytest.raises(ValueError):
    _loader(src, seed=2**64)


def test_canary_users_get_distinct_keys():
  src = users_lib.UserKeyedSource(_records(), "user")
  canaries = [{"images": [np.zeros((2, 2, 3), np.uint8)] * 2, "label": -1,
               "user": -1, "row": -1} for _ in range(5)]
  app = users_lib.AppendedUsers(src, canaries)
  keys = users_lib.user_keys(app)
  assert keys.size == 65 and np.unique(keys).size == 65
  np.testing.assert_array_equal(keys[:60], src.user_keys)


def test_heldout_rule_is_a_public_function_of_the_id():
  ids = [f"f{j:04d}_{j % 7:02d}" for j in range(2000)]
  held = [users_lib.is_heldout_user(u, 0.1) for u in ids]
  assert 0.07 < np.mean(held) < 0.13
  assert held == [users_lib.is_heldout_user(u.encode(), 0.1) for u in ids]
  assert not any(users_lib.is_heldout_user(u, 0.0) for u in ids)
