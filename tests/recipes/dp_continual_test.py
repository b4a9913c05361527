"""DP continual pretraining: split, switch, automatic clipping, tiny e2e."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dp_continual as continual_config
from dpjax import privacy
from dpjax import recipes
from dpjax.data import splits
from dpjax.data import synthetic
from dpjax.recipes import dp_continual
from dpjax.train import metrics
from dpjax.train import privacy_settings
from dpjax.train import step as step_lib


def small_config(**overrides):
  """:tiny with a 32-d x 1 ViT, 2 + 2 steps and small evaluations."""
  c = continual_config.get_config("tiny")
  c.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.data.update(num_examples=1000, eval_num_examples=64, public_fraction=0.1)
  c.public.update(steps=2, batch_size=32, warmup_steps=1)
  c.train.update(steps=2, batch_size=48, microbatch_size=32, log_every=1,
                 checkpoint_every=10)
  c.monitor.update(num_examples=16, probes=1, trace_every=2)
  c.data.update(probe_train_examples=90, probe_test_examples=60)
  c.evals.fine_tune.update(steps=3, head_only_steps=1, batch_size=16)
  c.privacy.noise_seed = 0
  c.update_from_flattened_dict(overrides)
  return c


def _private_indices(config) -> np.ndarray:
  """The private share re-derived from the rule: record i of `data.source`
  is public iff the keyed hash of its key and data.split_seed is <
  data.public_fraction."""
  d = config.data
  src = synthetic.Classes(num_examples=d.num_examples,
                          image_size=d.image_size, seed=config.seed)
  u = splits.share_uniforms(src.record_keys(), d.split_seed)
  return np.flatnonzero(u >= d.public_fraction)


def test_public_and_private_phases_see_disjoint_indices():
  config = small_config(**{"monitor.enabled": False})
  task = dp_continual.build(config)
  pub, dp = task.phases
  assert (pub.name, pub.private, dp.name, dp.private) == (
      "public", False, "dp", True)
  assert isinstance(dp.source, splits.Subset)
  a, b = pub.source.source_indices(), dp.source.source_indices()
  assert len(a) + len(b) == 1000 and not set(a) & set(b)
  np.testing.assert_array_equal(b, _private_indices(config))
  n_priv = len(b)
  assert abs(n_priv - 900) <= 5 * 9.5  # Binomial(1000, 0.9): sd 9.5.
  assert dp.num_examples == len(dp.source) == n_priv  # N = N_priv.
  # Every index the private Poisson sampler can draw maps into the private
  # share: the sampler ranges over [0, N_priv) of the private VIEW.
  public = set(a.tolist())
  for step in range(20):
    idx = privacy.sample_indices(0, step, dp.num_examples, 0.3)
    assert idx.max() < len(dp.source)
    assert not {dp.source.source_index(i) for i in idx} & public
  with pytest.raises(IndexError):
    dp.source[len(dp.source)]


def test_arms_have_equal_total_steps():
  steps = {}
  for arm in dp_continual.ARMS:
    task = dp_continual.build(small_config(arm=arm,
                                           **{"monitor.enabled": False}))
    steps[arm] = [(p.name, p.private, p.steps) for p in task.phases]
  assert steps == {
      "continual": [("public", False, 2), ("dp", True, 2)],
      "private_only": [("dp", True, 4)],
      "public_only": [("public", False, 4)],
      "nonprivate": [("nonprivate", False, 4)]}
  with pytest.raises(ValueError, match="config.arm"):
    dp_continual.build(small_config(arm="mixed"))


def _adam_states(mode):
  params = {"w": jnp.ones(3)}
  public = optax.adamw(optax.linear_schedule(0.1, 0.0, 10), weight_decay=0.1)
  dp = optax.adamw(optax.linear_schedule(0.2, 0.0, 10), weight_decay=0.1)
  old = public.init(params)
  for _ in range(3):
    _, old = public.update({"w": jnp.array([1.0, -2.0, 3.0])}, old, params)
  new = dp.init(params)
  reset = dp_continual.reset_fn(mode)
  return old, new, (reset(old, new) if reset else new)


def test_switch_resets_first_moment_and_keeps_second_and_count():
  old, new, out = _adam_states("m")
  adam, sched = out[0], out[2]
  np.testing.assert_array_equal(adam.mu["w"], 0.0)
  np.testing.assert_array_equal(adam.nu["w"], old[0].nu["w"])
  assert int(adam.count) == 3 and np.all(old[0].mu["w"] != 0)
  assert int(sched.count) == 0  # the DP phase's own lr schedule restarts.
  assert jax.tree.structure(out) == jax.tree.structure(new)


@pytest.mark.parametrize("mode", ["none", "v", "both"])
def test_switch_alternatives(mode):
  old, _, out = _adam_states(mode)
  adam = out[0]
  keep_m, keep_v, count = {"none": (1, 1, 3), "v": (1, 0, 3),
                           "both": (0, 0, 0)}[mode]
  assert np.all((adam.mu["w"] == old[0].mu["w"]) == bool(keep_m))
  assert np.all((adam.nu["w"] == old[0].nu["w"]) == bool(keep_v))
  assert int(adam.count) == count


def test_switch_needs_adam_in_both_phases():
  params = {"w": jnp.ones(3)}
  old = optax.sgd(0.1, momentum=0.9).init(params)
  new = optax.adamw(0.1).init(params)
  with pytest.raises(ValueError, match="switch.reset"):
    dp_continual.reset_fn("m")(old, new)


def test_automatic_clipping_contribution_below_c_and_sensitivity_c():
  """Each example's normalised gradient has norm < C, so one example moves
  the sum by < C, and the loop's noise std is sigma * C (what the
  accountant assumes for noise multiplier sigma)."""
  c, gamma, sigma, b = 0.5, 0.01, 1.3, 4.0
  loss = lambda w, x: jnp.sum(w * x) + 0.5 * jnp.sum(w ** 2) * x[0]
  fn = privacy.clipped_grad(loss, c, clipping="normalize",
                            normalize_gamma=gamma)
  rs = np.random.RandomState(0)
  xs = jnp.asarray(rs.normal(size=(6, 5)) * np.array([[1e-3], [1e-1], [1],
                                                      [10], [1e3], [1e6]]))
  w = jnp.asarray(rs.normal(size=5))
  for i in range(6):
    one, aux = fn(w, xs[i:i + 1], jnp.ones(1))
    norm = float(privacy.global_norm(one))
    g = float(privacy.global_norm(jax.grad(loss)(w, xs[i])))
    assert norm < c and norm == pytest.approx(c * g / (g + gamma), rel=1e-4)
  full, _ = fn(w, xs, jnp.ones(6))
  for i in range(6):
    mask = jnp.ones(6).at[i].set(0.0)
    without, _ = fn(w, xs, mask)
    diff = jax.tree.map(lambda a, b_: a - b_, full, without)
    assert float(privacy.global_norm(diff)) < c
  # The loop's sum function carries C to the noise: std = sigma * C / B.
  cfg = small_config(**{"privacy.clipping": "normalize",
                        "privacy.l2_clip_norm": c,
                        "privacy.noise_multiplier": sigma})
  s = privacy_settings.from_config(cfg.privacy, num_examples=900,
                                   batch_size=48, steps=2)
  assert (s.clipping, s.l2_clip_norm, s.noise_multiplier) == (
      "normalize", c, sigma)
  sum_fn = step_lib.private_sum_fn(loss, s.l2_clip_norm, clipping=s.clipping)
  assert (sum_fn.l2_sensitivity, sum_fn.unit) == (c, "example")
  tx = step_lib.phase_optimizer(optax.sgd(1.0), noise=privacy.add_noise(
      sum_fn, s.noise_multiplier, b, seed=jax.random.PRNGKey(1)))
  params = {"w": jnp.zeros(20_000)}
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params,
                              tx.init(params), jax.random.PRNGKey(2))
  acc = step_lib.zeros_accumulator(params)
  out, _ = step_lib.apply(state, acc, optimizer=tx)
  assert float(jnp.std(out.params["w"])) == pytest.approx(sigma * c / b,
                                                          rel=0.03)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("continual")
  config = small_config()
  config.train.ema_decay = 0.9  # Kept across the public -> DP switch.
  return workdir, recipes.run(config, str(workdir))


def test_tiny_run_epsilon_counts_only_dp_steps(tiny_run):
  workdir, results = tiny_run
  assert results["step"] == 4 and results["public/private"] is False
  n_priv = len(_private_indices(small_config()))
  assert results["dp/num_examples"] == n_priv
  assert results["delta"] == pytest.approx(n_priv ** -1.1)  # N_priv^-1.1.
  assert results["dp/clipping"] == "normalize"
  want = privacy.epsilon(results["dp/noise_multiplier"],
                         results["dp/sampling_rate"], 2, results["delta"],
                         accountant=results["accountant"])
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  assert results["epsilon"] <= 8.0 + 1e-9
  logged = metrics.read_csv(str(workdir))
  assert [s for s, _ in logged["nonprivate/loss"]] == [1, 2]
  assert [s for s, _ in logged["private/loss"]] == [3, 4]
  eps = dict(logged["epsilon"])
  assert eps[1] == eps[2] == 0.0 and 0 < eps[3] < eps[4]


def test_tiny_run_logs_diagnostics_and_evaluates(tiny_run):
  workdir, results = tiny_run
  logged = metrics.read_csv(str(workdir))
  assert [s for s, _ in logged["monitor/heldout_loss"]] == [1, 2, 3, 4]
  assert [s for s, _ in logged["monitor/loss_drop_per_step"]] == [2, 3, 4]
  traces = dict(logged["monitor/hessian_trace"])
  assert sorted(traces) == [1, 2, 4]
  assert all(math.isfinite(v) for v in traces.values())
  for key in ("eval/classifier/top1", "eval/classifier/top5",
              "eval/linear_probe/label_acc", "eval/fine_tune/acc",
              "eval/fine_tune/train_acc"):
    assert 0.0 <= results[key] <= 1.0
  assert results["eval/classifier/ce"] > 0
  # The EMA survived the phase switch (the recipe's reset_opt_state keeps
  # Adam's second moment; the EMA restarts at the DP phase's params).
  assert 0.0 <= results["eval_ema/classifier/top1"] <= 1.0


def test_hutchinson_estimate_matches_exact_trace_on_a_quadratic():
  a = jnp.diag(jnp.arange(1.0, 6.0))
  loss = lambda p, ex: 0.5 * p["w"] @ a @ p["w"] * ex["image"].sum() + (
      0.0 * ex["label"])
  held = {"image": np.ones((2, 1), np.float32), "label": np.zeros(2)}
  mon = dp_continual.Monitor(loss, held, probes=3, trace_every=1)
  # Rademacher probes: v^T A v = tr(A) exactly for diagonal A.
  assert mon.hessian_trace({"w": jnp.ones(5)}, 0) == pytest.approx(15.0)
