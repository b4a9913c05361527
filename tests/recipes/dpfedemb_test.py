"""DP-FedEmb: user-level sensitivity, sampling, accounting, tiny e2e run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpfedemb as fedemb_config
from dpjax import errors
from dpjax import privacy
from dpjax import recipes
from dpjax.data import clients
from dpjax.data import users as users_lib
from dpjax.privacy import clipping
from dpjax.recipes import dpfedemb
from dpjax.recipes import dpfedemb_data


def small_config(**overrides):
  """:tiny shrunk: few users, rounds and eval images (fast)."""
  c = fedemb_config.get_config("tiny")
  c.data.update(num_users=200, public_num_identities=20,
                eval_num_identities=20, eval_num_examples=120)
  c.public.update(steps=2, batch_size=32, microbatch_size=32)
  c.fedemb.update(users_per_client=4, max_examples_per_user=4,
                  client_batch_size=8, local_classes=4, client_epochs=2,
                  reconst_steps=2)  # 4 local steps: 2 head-only, 2 joint.
  c.train.update(steps=3, batch_size=32, microbatch_size=8, log_every=1,
                 checkpoint_every=10)
  c.privacy.noise_seed = 0
  c.update_from_flattened_dict(overrides)
  return c


def _dp_phase(config):
  task = dpfedemb.build(config)
  phase = [p for p in task.phases if p.name in ("dp", "federated")][0]
  return task, phase


def _round(phase, step=0, micro=8):
  it = phase.make_batches(source=phase.source,
                          sampling_rate=phase.batch_size / phase.num_examples,
                          seed=0, start_step=step, num_steps=step + 1,
                          global_microbatch=micro, process_index=0,
                          process_count=1, num_workers=0)
  return next(it)


def _dist(a, b):
  return float(clipping.global_norm(jax.tree.map(lambda x, y: x - y, a, b)))


@pytest.fixture(scope="module")
def dp_setup():
  config = small_config()
  task, phase = _dp_phase(config)
  params = task.init_params(jax.random.PRNGKey(0))
  element = _round(phase)
  batch = jax.tree.map(lambda x: x[0], element["example"])
  mask = element["mask"][0]
  return config, phase, params, batch, mask, jax.jit(phase.clipped_sum_fn)


def test_changing_all_of_one_users_examples_moves_aggregate_at_most_c(
    dp_setup):
  config, _, params, batch, mask, fn = dp_setup
  c, k, e = (config.privacy.l2_clip_norm, config.fedemb.users_per_client,
             config.fedemb.max_examples_per_user)
  base, aux = fn(params, batch, mask)
  users = float(np.sum(np.asarray(batch["num_users"]) * np.asarray(mask)))
  assert float(aux["count"]) == users > float(mask.sum())  # counts USERS.
  assert k > 1  # so clients are clipped to C/2 (a user moves one by <= C).
  assert _dist(base["head"], jax.tree.map(jnp.zeros_like, base["head"])) == 0
  client = int(np.flatnonzero(np.asarray(mask))[0])
  rows = slice(0, e)  # all examples of the client's first user.
  worst = 0.0
  for seed in range(3):
    changed = jax.tree.map(np.array, batch)
    r = np.random.default_rng(seed)
    img = changed["image"][client, rows]
    changed["image"][client, rows] = r.uniform(-1, 1, img.shape)
    changed["label"][client, rows] = 10_000 + seed
    if seed == 2:  # remove the user (its slots become padding).
      changed["example_mask"][client, rows] = 0.0
    out, _ = fn(params, changed, mask)
    worst = max(worst, _dist(base, out))
  assert 1e-4 < worst <= c * (1 + 1e-5)


def test_users_outside_the_sample_contribute_nothing(dp_setup):
  _, _, params, batch, mask, fn = dp_setup
  base, _ = fn(params, batch, mask)
  dropped = np.asarray(mask).copy()
  client = int(np.flatnonzero(dropped)[0])
  dropped[client] = 0.0  # this client's users are not in the sample.
  garbage = jax.tree.map(np.array, batch)
  garbage["image"][client] = np.nan
  out, _ = fn(params, garbage, jnp.asarray(dropped))
  ref, _ = fn(params, batch, jnp.asarray(dropped))
  assert _dist(out, ref) == 0.0 and _dist(base, ref) > 0.0


def test_rounds_hash_poisson_sampled_users_into_g_clients():
  config = small_config()
  src = dpfedemb_data.private_source(config)
  k, q, e = config.fedemb.users_per_client, 32 / 200, 4
  g = 32 // k  # G = expected users / k, from the config alone.
  keys = users_lib.user_keys(src)  # synthetic: the user index.
  sizes = []
  for step in range(40):
    rc = clients.round_clients(keys, 0, step, q, k, g, 2 * k)
    flat = np.concatenate(rc.members)
    assert np.unique(flat).size == flat.size  # each user in one client.
    assert rc.num_users == rc.num_sampled or max(
        m.size for m in rc.members) == 2 * k  # only overflow drops users.
    sizes.append(rc.num_sampled)
  assert abs(np.mean(sizes) - q * 200) < 6  # E[users] = q N (sd ~1.8).
  _, phase = _dp_phase(config)
  el = _round(phase, step=5)
  real = el["mask"].reshape(-1) > 0
  assert int(el["batch_size"]) == int(el["example"]["num_users"].sum())
  rc = clients.round_clients(keys, 0, 5, q, k, g, 2 * k)
  assert el["user"].reshape(-1)[real].tolist() == rc.ids.tolist()
  assert el["example"]["label"].shape[-1] == 2 * k * e  # capacity 2k.
  labels = el["example"]["label"].reshape(-1, 2 * k * e)[real]
  ex_mask = el["example"]["example_mask"].reshape(-1, 2 * k * e)[real]
  for members, lab, m in zip(rc.members, labels, ex_mask):
    assert set(lab[m > 0].tolist()) == set(members.tolist())  # identity = u.


def test_client_count_and_capacity_do_not_depend_on_population():
  states = []
  for n in (200, 199):
    _, phase = _dp_phase(small_config(**{"data.num_users": n}))
    it = phase.make_batches(source=phase.source,
                            sampling_rate=phase.batch_size / phase.num_examples,
                            seed=2**64 - 1, start_step=0, num_steps=2,
                            global_microbatch=8, process_index=0,
                            process_count=1, num_workers=0)
    states.append(it.get_state())
    assert all(np.all(el["user"] < 8) for el in it)
  assert states[0]["num_clients"] == states[1]["num_clients"] == 32 // 4
  assert states[0]["client_capacity"] == states[1]["client_capacity"] == 8


class _FakeWriters:
  """A small FEMNIST-like record source: 120 writers x 8 records, each
  writer with labels in both [0, 36) and [36, 62)."""

  def __init__(self):
    self.recs = [{"image": np.full((28, 28, 1), i % 256, np.uint8),
                  "label": (8 * (i // 120) + i % 8) % 62,
                  "user": f"f{i % 120:04d}_{i % 120 % 7:02d}".encode()}
                 for i in range(960)]

  def __len__(self):
    return len(self.recs)

  def __getitem__(self, i):
    return dict(self.recs[int(i)])


def test_paper_preset_evaluates_on_held_out_writers(monkeypatch):
  fake = _FakeWriters()
  monkeypatch.setattr(dpfedemb_data.sources, "make_source",
                      lambda spec, **kw: fake)
  config = fedemb_config.get_config("paper")
  assert config.data.heldout_user_fraction > 0
  train = dpfedemb_data.private_source(config)
  train_users = {train.user_id(u) for u in range(train.num_users)}
  evals = dpfedemb_data.eval_source(config)
  eval_users = {evals[i]["user"]
                for i in dpfedemb_data.eval_indices(config, evals)}
  all_users = {r["user"] for r in fake.recs}
  assert train_users and eval_users
  assert not train_users & eval_users  # whole writers held out.
  assert train_users | eval_users == all_users
  assert all(fake[i]["label"] < 36 for u in range(train.num_users)
             for i in train.user_indices(u))
  arrays = dpfedemb_data.eval_arrays(config)
  assert arrays["image"].shape[1:] == (28, 28, 3)
  assert set(arrays["identity"].tolist()) <= set(range(36, 62))


def test_tiny_preset_evaluates_on_held_out_identities():
  config = fedemb_config.get_config("tiny")
  private = dpfedemb_data.private_source(config)
  public = dpfedemb_data.public_source(config)
  evals = dpfedemb_data.eval_source(config)
  ranges = [(s.first_identity, s.first_identity + s.num_users)
            for s in (private, public, evals)]
  assert ranges == sorted(ranges)
  assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint.
  with pytest.raises(ValueError, match="heldout_user_fraction"):
    dpfedemb_data.private_source(
        small_config(**{"data.heldout_user_fraction": 0.1}))


def test_accounting_counts_rounds_not_examples_and_trains_end_to_end(
    tmp_path):
  config = small_config()
  results = recipes.run(config, str(tmp_path))
  assert results["dp/num_examples"] == 200  # users, not examples.
  assert results["dp/sampling_rate"] == pytest.approx(32 / 200)
  assert results["delta"] == pytest.approx(200 ** -1.1)
  want = privacy.epsilon(results["dp/noise_multiplier"], 32 / 200, 3,
                         results["delta"])
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  assert results["epsilon"] <= 4.0 + 1e-6
  assert results["step"] == 2 + 3  # public steps + rounds.
  for far in ("0.001", "0.1"):
    assert 0.0 <= results[f"eval/retrieval/recall_at_far_{far}"] <= 1.0
  assert "eval/retrieval/recall_at_1" in results


def test_server_optimizer_never_moves_the_head():
  config = small_config()
  task, phase = _dp_phase(config)
  params = task.init_params(jax.random.PRNGKey(0))
  state = phase.optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = phase.optimizer.update(grads, state, params)
  assert _dist(updates["head"],
               jax.tree.map(jnp.zeros_like, params["head"])) == 0.0
  assert float(clipping.global_norm(updates["backbone"])) > 0


def test_local_labels_are_ranks_of_distinct_real_labels():
  labels = jnp.array([7, 3, 7, 9, 3, 100])
  mask = jnp.array([1, 1, 1, 1, 1, 0])
  out = dpfedemb.local_labels(labels, mask, 4)
  assert out[:5].tolist() == [1, 0, 1, 2, 0]


def test_bad_phase_names_fail():
  with pytest.raises(ValueError, match="config.phases"):
    dpfedemb.build(small_config(phases="dp,extra"))


def test_imprinted_kernel_is_normalised_class_means_of_real_rows():
  z = jnp.array([[3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [9.0, 9.0]])
  labels = jnp.array([0, 1, 1, 0])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # row 3 is padding: ignored.
  fallback = jnp.full((2, 3), 7.0)  # class 2 has no example: kept.
  k = dpfedemb.imprinted_kernel(z, labels, mask, fallback)
  np.testing.assert_allclose(k, [[1.0, 0.0, 7.0], [0.0, 1.0, 7.0]],
                             atol=1e-6)


def test_bad_head_init_fails():
  with pytest.raises(ValueError, match="config.fedemb.head_init"):
    dpfedemb.build(small_config(**{"fedemb.head_init": "zeros"}))


def test_an_evaluation_on_held_out_private_users_is_private_eval():
  """:paper evaluates held-out writers of the PRIVATE source: not public
  (its metrics are private_eval/, never exported); :tiny's synthetic
  identities (and the smoke's stand-ins) are public; eval_public=True is
  refused where the evaluation reads users of the private source."""
  assert not fedemb_config.get_config("paper").data.eval_public
  assert fedemb_config.get_config("paper,smoke").data.eval_public
  assert dpfedemb.build(small_config()).evaluators["retrieval"].public
  private = dpfedemb.build(small_config(**{"data.eval_public": False}))
  assert private.evaluators["retrieval"].public is False
  paper = fedemb_config.get_config("paper")
  assert not dpfedemb.eval_is_public(paper)
  for overrides in ({}, {"heldout_user_fraction": 0.0}):
    paper.data.update(dict(eval_public=True, **overrides))
    with pytest.raises(errors.ConfigError,
                       match=r"config.data.eval_public=True is invalid"):
      dpfedemb.eval_is_public(paper)
