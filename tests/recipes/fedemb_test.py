"""DP-FedEmb: user-level sensitivity, sampling, accounting, tiny e2e run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpfedemb as fedemb_config
from dpjax import privacy
from dpjax.privacy import clipping
from dpjax.recipes import fedemb
from dpjax.recipes import fedemb_data
from dpjax.train import loop


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
  task = fedemb.build(config)
  phase = [p for p in task.phases if p.name in ("dp", "federated")][0]
  return task, phase


def _round(phase, step=0, micro=8):
  it = phase.make_batches(seed=0, start_step=step, num_steps=step + 1,
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
  assert float(aux["count"]) == k * float(mask.sum())  # counts USERS.
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


def test_rounds_sample_disjoint_groups_of_k_users_poisson():
  config = small_config()
  src = fedemb.private_source(config)
  k, q = config.fedemb.users_per_client, 32 / 200
  sizes = []
  for step in range(40):
    groups = fedemb_data._RoundGroups(src, k, 4, 0, step)
    ids = np.concatenate([groups.members(g) for g in range(groups.num_users)])
    assert sorted(ids.tolist()) == list(range(200))  # a partition.
    sampled = privacy.sample_indices(0, step, groups.num_users, q)
    sizes.append(sum(groups.members(g).size for g in sampled))
  assert abs(np.mean(sizes) - q * 200) < 6  # E[users] = q N (sd ~1.8).
  _, phase = _dp_phase(config)
  el = _round(phase, step=5)
  real = el["mask"].reshape(-1) > 0
  assert int(el["batch_size"]) == int(el["example"]["num_users"].sum())
  groups = fedemb_data._RoundGroups(src, k, 4, 0, 5)
  want = privacy.sample_indices(0, 5, groups.num_users, q)
  assert sorted(el["user"].reshape(-1)[real].tolist()) == want.tolist()
  labels = el["example"]["label"].reshape(-1, k * 4)[real]
  for g, lab in zip(el["user"].reshape(-1)[real], labels):
    assert set(lab.tolist()) == set(groups.members(int(g)).tolist())


def test_accounting_counts_rounds_not_examples_and_trains_end_to_end(
    tmp_path):
  config = small_config()
  results = loop.run(config, str(tmp_path))
  assert results["dp/num_examples"] == 200  # users, not examples.
  assert results["dp/sampling_rate"] == pytest.approx(32 / 200)
  assert results["delta"] == pytest.approx(1 / 200)
  want = privacy.epsilon(results["dp/noise_multiplier"], 32 / 200, 3,
                         1 / 200)
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
  out = fedemb.local_labels(labels, mask, 4)
  assert out[:5].tolist() == [1, 0, 1, 2, 0]


def test_bad_phase_names_fail():
  with pytest.raises(ValueError, match="config.phases"):
    fedemb.build(small_config(phases="dp,extra"))


def test_imprinted_kernel_is_normalised_class_means_of_real_rows():
  z = jnp.array([[3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [9.0, 9.0]])
  labels = jnp.array([0, 1, 1, 0])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # row 3 is padding: ignored.
  fallback = jnp.full((2, 3), 7.0)  # class 2 has no example: kept.
  k = fedemb.imprinted_kernel(z, labels, mask, fallback)
  np.testing.assert_allclose(k, [[1.0, 0.0, 7.0], [0.0, 1.0, 7.0]],
                             atol=1e-6)


def test_bad_head_init_fails():
  with pytest.raises(ValueError, match="config.fedemb.head_init"):
    fedemb.build(small_config(**{"fedemb.head_init": "zeros"}))
