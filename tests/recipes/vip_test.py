"""ViP end to end on the real loop: two phases, ledger, resume, warm start."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vip as vip_config
from dpjax import privacy
from dpjax import recipes
from dpjax.recipes import vip
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import metrics


def small_config(**overrides):
  """:tiny with 2 + 2 steps and small evaluations (fast)."""
  c = vip_config.get_config("tiny")
  c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64,
                 decoder_width=32, decoder_depth=1, decoder_heads=2)
  c.pretrain.update(steps=2, batch_size=32, warmup_steps=1,
                    num_examples=1000)
  c.train.update(steps=2, batch_size=24, microbatch_size=16, log_every=1,
                 warmup_steps=1, checkpoint_every=1)
  c.data.update(num_examples=2000, eval_num_examples=48,
                probe_train_examples=96)
  # Reproducible (not secret) keys: two runs must take the same batches.
  c.privacy.noise_seed = 0
  c.privacy.sampling_seed = 0
  c.update_from_flattened_dict(overrides)
  return c


def _params(workdir, config):
  task = vip.build(config)
  abstract = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  params = ckpt.restore_params(ckpt_lib.abstract_like(abstract))
  ckpt.close()
  return params


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  return workdir, recipes.run(small_config(), str(workdir))


@pytest.fixture(scope="module")
def syn_run(tmp_path_factory):
  """Phase 1 only: a Syn-ViP checkpoint."""
  workdir = tmp_path_factory.mktemp("syn")
  return workdir, recipes.run(small_config(phases="pretrain"), str(workdir))


def test_two_phases_and_only_the_dp_phase_spends_budget(full_run):
  workdir, results = full_run
  assert results["step"] == 4
  assert results["pretrain/private"] is False
  assert results["dp/private"] is True
  assert results["dp/l2_clip_norm"] == pytest.approx(0.1)
  assert results["delta"] == pytest.approx(2000 ** -1.1)  # Default.
  assert results["delta_rule"] == "N^-1.1"
  want = privacy.epsilon(results["dp/noise_multiplier"],
                         results["dp/sampling_rate"], 2, results["delta"],
                         accountant=results["accountant"])
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  logged = metrics.read_csv(str(workdir))
  assert [s for s, _ in logged["nonprivate/loss"]] == [1, 2]
  assert [s for s, _ in logged["private/loss"]] == [3, 4]
  eps = dict(logged["epsilon"])
  assert eps[1] == eps[2] == 0.0 and 0 < eps[3] < eps[4]
  for key in ("eval/linear_probe/shape_acc", "eval/linear_probe/color_acc",
              "eval/mae/heldout_loss"):
    assert key in results and math.isfinite(results[key])


def test_periodic_evaluation_is_logged_and_leaves_training_unchanged(
    full_run, tmp_path):
  """log_steps=2: eval rows at step 2 (mid-run, end of the public phase)
  and 4 (the end, once); the params are those of the end-only run."""
  workdir, results = full_run
  config = small_config(**{"evals.heldout_loss.log_steps": 2,
                           "evals.linear_probe.log_steps": -1})  # off.
  periodic = recipes.run(config, str(tmp_path))
  logged = metrics.read_csv(str(tmp_path))
  assert [s for s, _ in logged["eval/mae/heldout_loss"]] == [2, 4]
  assert "eval/linear_probe/shape_acc" not in logged
  assert periodic["eval/mae/heldout_loss"] == results["eval/mae/heldout_loss"]
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, config),
               _params(tmp_path, config))


def test_resume_between_phase_1_and_phase_2_matches_one_run(
    full_run, syn_run, tmp_path):
  workdir, results = full_run
  first = syn_run[1]
  # Phase 1 alone is not private: no epsilon (None, never 0).
  assert first["step"] == 2 and first["epsilon"] is None
  assert first["private"] is False
  assert "dp/private" not in first and "delta" not in first
  tmp_path = tmp_path / "resumed"
  shutil.copytree(syn_run[0], tmp_path)
  resumed = recipes.run(small_config(), str(tmp_path))  # same dir: phase 2.
  assert resumed["step"] == 4
  assert resumed["epsilon"] == pytest.approx(results["epsilon"], rel=1e-12)
  config = small_config()
  a, b = _params(workdir, config), _params(tmp_path, config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               a, b)
  logged = metrics.read_csv(str(tmp_path))
  assert [s for s, _ in logged["private/loss"]] == [3, 4]


def test_phase_2_from_a_phase_1_checkpoint(syn_run, tmp_path):
  syn, syn_results = syn_run
  # Warm start, no training: evaluates exactly the phase-1 params.
  warm = recipes.run(small_config(**{
      "pretrain.steps": 0, "init_checkpoint": str(syn), "eval_only": True}),
                  str(tmp_path / "warm"))
  assert warm["eval/mae/heldout_loss"] == pytest.approx(
      syn_results["eval/mae/heldout_loss"], rel=1e-6)
  assert "pretrain/private" not in warm and warm["epsilon"] == 0.0


def test_per_example_gradients_are_independent_across_examples():
  config = small_config()
  model = vip.build_model(config)
  loss_fn = vip.make_loss_fn(model)
  task = vip.build(config)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  rs = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rs.uniform(-1, 1, (4, 32, 32, 3)),
                                jnp.float32),
           "rng": jax.random.split(jax.random.PRNGKey(1), 4)}

  @jax.jit
  def grads_batched(b):  # One batched forward; d loss_i / d params per i.
    def losses(p):
      return model.apply({"params": p}, b["image"], b["rng"],
                         method=vip.mae.MAE.loss)
    return jax.jacrev(losses)(params)

  g0 = grads_batched(batch)
  per_example = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(
      params, batch)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
               g0, per_example)
  changed = {"image": batch["image"].at[2].set(-batch["image"][2]),
             "rng": batch["rng"].at[2].set(jnp.array([7, 9], jnp.uint32))}
  g1 = grads_batched(changed)
  flat0 = jnp.concatenate([x.reshape(4, -1) for x in jax.tree.leaves(g0)], 1)
  flat1 = jnp.concatenate([x.reshape(4, -1) for x in jax.tree.leaves(g1)], 1)
  for i in (0, 1, 3):
    np.testing.assert_allclose(flat0[i], flat1[i], atol=1e-6)
  assert not np.allclose(flat0[2], flat1[2], atol=1e-3)


@pytest.mark.parametrize("override,message", [
    ({"phases": "dp,pretrain"}, "config.phases='dp,pretrain'"),
    ({"phases": "pretrain", "pretrain.steps": 0}, "config.pretrain.steps=0"),
    ({"pretrain.warmup_steps": 5}, "config.pretrain.warmup_steps=5"),
    ({"evals.linear_probe.type": "knn"}, "config.evals.linear_probe.type='knn'"),
])
def test_bad_configs_name_field_value_and_fix(override, message):
  with pytest.raises(ValueError, match=message) as err:
    vip.build(small_config(**override))
  assert ":" in str(err.value)


def test_paper_preset():
  c = vip_config.get_config()
  n = c.data.num_examples
  assert (c.train.batch_size, c.train.steps, c.privacy.l2_clip_norm,
          c.privacy.noise_multiplier) == (98_304, 6000, 0.1, 0.48)
  assert c.train.learning_rate == pytest.approx(1.5e-5 * 98_304 / 256)
  assert c.privacy.delta == pytest.approx(1 / (2 * n))
  assert (c.train.b1, c.train.b2, c.train.weight_decay,
          c.train.warmup_steps) == (0.9, 0.95, 0.005, 1000)
  c.data.num_examples = 1000  # delta follows N unless set explicitly.
  assert c.privacy.delta == pytest.approx(1 / 2000)
  model = vip.build_model(vip_config.get_config())
  assert (model.encoder["width"], model.encoder["depth"],
          model.encoder["patch_size"]) == (768, 12, 16)
  assert (model.decoder_width, model.decoder_depth, model.mask_ratio) == (
      512, 4, 0.75)
  # The paper's triple is epsilon 8 (7.996 by RDP) at delta = 1/(2N).
  eps = privacy.epsilon(0.48, 98_304 / n, 6000, 1 / (2 * n),
                        accountant="rdp")
  assert 7.9 < eps <= 8.0
