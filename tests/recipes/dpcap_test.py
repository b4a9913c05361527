"""DP-Cap end to end on the real loop: tiny runs, epsilon, data paths, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import dpcap as dpcap_config
from dpjax import privacy
from dpjax import recipes
from dpjax.recipes import dpcap
from dpjax.train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def small_config(**overrides):
  """:tiny with a handful of steps and small evaluations (fast)."""
  c = dpcap_config.get_config("tiny")
  c.train.update(steps=3, batch_size=48, microbatch_size=32, log_every=1,
                 warmup_steps=1,
                 checkpoint_every=2)
  c.data.update(num_examples=2000, eval_num_examples=64,
                probe_train_examples=128)
  c.evals.captioning.num_examples = 2
  c.privacy.noise_seed = 0
  c.update_from_flattened_dict(overrides)
  return c


def test_tiny_run_on_8_devices_reports_the_accountants_epsilon(tmp_path):
  config = small_config()
  results = recipes.run(config, str(tmp_path))
  assert results["step"] == 3
  want = privacy.epsilon(results["dp/noise_multiplier"],
                         results["dp/sampling_rate"], 3, results["delta"])
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  assert results["delta"] == pytest.approx(2000 ** -1.1)  # < 1/N.
  assert not results["tan_simulation"]
  for key in ("eval/linear_probe/shape_acc", "eval/zero_shot/acc",
              "eval/aro/acc", "eval/caption/heldout_loss",
              "eval/few_shot_1shape_color/5shot_acc",
              "eval/few_shot_1shape_shape/1shot_acc",
              "eval/caption/shape_token_acc",
              "eval/caption/relation_token_acc"):
    assert key in results
  logged = metrics.read_csv(str(tmp_path))
  assert [s for s, _ in logged["private/loss"]] == [1, 2, 3]
  assert "loss" not in logged  # private-data metrics carry their prefix.
  eps = [v for _, v in logged["epsilon"]]
  assert eps == sorted(eps) and eps[-1] == pytest.approx(results["epsilon"])
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["epsilon"] == pytest.approx(results["epsilon"])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
  assert json.load(open(tmp_path / "samples.json"))["captions"]


def test_tan_simulation_scales_sigma_and_is_labelled(tmp_path):
  config = dpcap_config.get_config("tiny,tan=8")
  assert config.privacy.tan_reference_batch_size == 512
  assert config.train.batch_size == 64
  config.train.update(steps=1, microbatch_size=64, warmup_steps=0)
  config.evals = ml_collections.ConfigDict(
      {"token_accuracy": config.evals.token_accuracy})
  config.privacy.noise_seed = 0
  # RDP: PLD of the simulation's own tiny sigma takes minutes on 2 cores.
  config.privacy.accountant = "rdp"
  results = recipes.run(config, str(tmp_path))
  assert results["tan_simulation"]
  ref_sigma = results["tan_reference_noise_multiplier"]
  assert ref_sigma == pytest.approx(privacy.calibrate_noise_multiplier(
      8.0, 512 / 50000, 1, 50000 ** -1.1, accountant="rdp"), rel=1e-6)
  assert results["dp/noise_multiplier"] == pytest.approx(ref_sigma / 8)
  # Same total amount of noise sigma/B as the reference run.
  assert privacy.total_amount_of_noise(ref_sigma, 512) == pytest.approx(
      privacy.total_amount_of_noise(results["dp/noise_multiplier"], 64))
  # The logs track the simulated reference run's epsilon, not the
  # simulation's own (which results.json reports once, labelled).
  logged = metrics.read_csv(str(tmp_path))
  assert "epsilon" not in logged
  assert logged["tan_reference_epsilon"][-1][1] == pytest.approx(
      privacy.epsilon(ref_sigma, 512 / 50000, 1, 50000 ** -1.1,
                      accountant="rdp"), rel=1e-6)
  assert results["epsilon"] > 8


def test_tfds_fixture_trains_through_the_pipeline(tmp_path):
  config = small_config(**{
      "data.source": "tfds:dpjax_tiny_captions",
      "data.data_dir": os.path.join(REPO, "tests/fixtures/tfds"),
      "data.image_size": 16, "data.tokenizer": "bytes",
      "data.max_caption_len": 24, "train.batch_size": 4,
      "train.microbatch_size": 8, "train.steps": 2,
      "privacy.target_epsilon": 50.0})
  config.evals = ml_collections.ConfigDict({
      k: config.evals[k] for k in ("few_shot_shape", "few_shot_color",
                                   "heldout_loss", "token_accuracy")})
  results = recipes.run(config, str(tmp_path))
  assert results["dp/num_examples"] == 6
  assert results["step"] == 2
  assert results["eval/caption/heldout_loss"] > 0


@pytest.mark.parametrize("override,message", [
    ({"data.source": "tfds:no_such_dataset"}, "data.source='tfds:no_such"),
    ({"privacy.accountant": "gdp"}, "config.privacy.accountant='gdp'"),
    ({"train.microbatch_size": 12}, "config.train.microbatch_size=12"),
    ({"train.batch_size": 10**9}, "config.train.batch_size=1000000000"),
])
def test_bad_configs_name_field_value_and_fix(tmp_path, override, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
    recipes.run(small_config(**override), str(tmp_path))
  assert ":" in str(err.value)  # the message goes on to say what to do.


def test_command_line_on_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "dpjax.main",
         "--config=configs/dpcap.py:tiny", f"--workdir={tmp_path}",
         "--config.train.steps=2", "--config.train.warmup_steps=0",
         "--config.train.batch_size=32",
         "--config.train.microbatch_size=32", "--config.data.num_examples=500",
         "--config.privacy.noise_seed=0",
         "--config.data.eval_num_examples=32"] + [
             f"--config.evals.{k}.log_steps=-1"  # off.
             for k in ("linear_probe", "linear_probe_1shape",
                       "few_shot_shape", "few_shot_color", "zero_shot", "aro",
                       "captioning")]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  assert results["step"] == 2 and results["epsilon"] > 0


def test_decoder_lr_scale_scales_only_decoder_updates():
  t = dpcap_config.get_config("tiny").train
  t.warmup_steps = 0  # a non-zero first-step learning rate.
  params = {"encoder": {"w": jnp.ones((3,))},
            "decoder": {"w": jnp.ones((3,)), "n": {"b": jnp.ones((2,))}}}
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  ups = {}
  for scale in (1.0, 2.0):
    t.decoder_lr_scale = scale
    opt = dpcap.optimizer(t)
    ups[scale], _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_allclose(ups[2.0]["encoder"]["w"], ups[1.0]["encoder"]["w"])
  for a, b in zip(jax.tree.leaves(ups[2.0]["decoder"]),
                  jax.tree.leaves(ups[1.0]["decoder"])):
    np.testing.assert_allclose(a, 2 * b, rtol=1e-6)
    assert np.all(np.asarray(b) != 0)
