"""privacy.mechanism="blt" in the training loop: the noise head, the
b-cyclic sampler, the ledger (one Gaussian mechanism per phase, rho
increments per step), results, the plan, and the config errors."""

import dataclasses

import pytest

from configs import dp_linear
from dpjax import errors
from dpjax import privacy
from dpjax import recipes
from dpjax.train import phase_plan


def _config(**privacy_overrides):
  config = dp_linear.get_config()
  config.train.update(dict(steps=12, log_every=4, checkpoint_every=100))
  config.privacy.update(dict(dict(mechanism="blt", min_separation=4, blt_buffers=3),
                             **privacy_overrides))
  config.evals.accuracy.log_steps = -1
  return config


def test_trains_with_blt_noise_and_its_accounting(tmp_path):
  config = _config()
  results = recipes.run(config, str(tmp_path))
  assert results["mechanism"] == "blt" and results["min_separation"] == 4
  assert results["step"] == 12 and results["secret_randomness"]
  sigma, delta = results["dp/noise_multiplier"], results["delta"]
  # One Gaussian mechanism of multiplier sigma, whatever q, T and b.
  want = privacy.blt.epsilon(sigma, delta)
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  assert want <= config.privacy.target_epsilon
  assert sigma == pytest.approx(privacy.blt.calibrate_noise_multiplier(
      config.privacy.target_epsilon, delta))
  strategy = privacy.blt.optimize(12, 4, 3)
  assert tuple(results["dp/blt_theta"]) == strategy.theta
  assert tuple(results["dp/blt_omega"]) == strategy.omega
  assert results["dp/blt_sensitivity"] == pytest.approx(
      privacy.blt.sensitivity(*strategy, 12, 4))


def test_ledger_budget_and_plan():
  config = _config()
  plan = phase_plan.resolve_phases(config, recipes.build(config).phases)[0]
  mechanism = plan.mechanism
  assert mechanism.name == "blt" and mechanism.min_separation == 4
  ledger = privacy.PrivacyLedger(plan.num_examples, plan.privacy.delta)
  for t in range(12):
    mechanism.record(ledger, t, 1)
  assert ledger.steps == 12 and len(ledger.entries) == 1
  assert ledger.rho == pytest.approx(plan.noise_multiplier ** -2, rel=1e-12)
  assert ledger.epsilon() == pytest.approx(mechanism.epsilon(), rel=1e-9)
  half = privacy.PrivacyLedger(plan.num_examples, plan.privacy.delta)
  mechanism.record(half, 0, 6)
  assert 0 < half.epsilon() < ledger.epsilon()  # Delta_6 < Delta_12.
  # The budget stop: a second phase's worth would exceed the target.
  over = ledger.copy()
  mechanism.record(over, 0, 12)
  assert over.epsilon() > config.privacy.target_epsilon


@pytest.mark.parametrize("overrides,field", [
    (dict(mechanism="blt2"), "privacy.mechanism='blt2'"),
    (dict(blt_buffers=0), "privacy.blt_buffers=0"),
    (dict(blt_buffers=17), "privacy.blt_buffers=17"),
    (dict(min_separation=13), "privacy.min_separation=13"),
    # batch 128 x 12 > N = 1500.
    (dict(min_separation=12), "privacy.min_separation=12"),
    (dict(bands=2), "privacy.bands=2"),  # BandMF's knob, not BLT's.
    (dict(tan_reference_batch_size=1024), "privacy.mechanism='blt'"),
])
def test_bad_settings_name_the_field(overrides, field):
  with pytest.raises(errors.ConfigError, match=f"config.{field}"):
    recipes.run(_config(**overrides), "/nonexistent-never-written")


def test_refused_for_phases_with_their_own_batching():
  config = _config()
  phase = dataclasses.replace(recipes.build(config).phases[0],
                              make_batches=lambda **kwargs: iter(()))
  with pytest.raises(errors.ConfigError,
                     match="config.privacy.mechanism='blt'.*own batching"):
    phase_plan.resolve_phases(config, [phase])


def test_plan_epsilon_is_blt_and_counts_the_buffers():
  from dpjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  config = _config(noise_multiplier=3.0)
  p = plan_lib.plan(config)["phases"][0]
  assert p["epsilon"] == privacy.blt.epsilon(3.0, p["delta"])
  dpsgd = plan_lib.plan(_config(noise_multiplier=3.0, mechanism="dpsgd",
                                min_separation=1, blt_buffers=4))["phases"][0]
  # Three float32 buffers like the params (64 x 10 + 10) on top.
  assert (p["optimizer_bytes_per_device"] -
          dpsgd["optimizer_bytes_per_device"]) == 3 * 4 * 650


def test_budget_stop_with_a_too_small_sigma(tmp_path):
  """A fixed sigma below the calibrated one: the run stops at the last step
  whose prefix (a Gaussian mechanism of multiplier sigma Delta_n / Delta_t)
  stays within the target."""
  config = _config(noise_multiplier=1.0)
  results = recipes.run(config, str(tmp_path))
  assert results["stopped_at_budget"] and 0 < results["step"] < 12
  target = config.privacy.target_epsilon
  assert results["epsilon"] <= target
  plan = phase_plan.resolve_phases(config, recipes.build(config).phases)[0]
  ledger = privacy.PrivacyLedger(plan.num_examples, plan.privacy.delta)
  plan.mechanism.record(ledger, 0, results["step"])
  assert results["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)
  plan.mechanism.record(ledger, results["step"], 1)
  assert ledger.epsilon() > target


def test_resuming_under_another_strategy_is_refused(tmp_path):
  """A checkpoint taken 12 steps into a BLT phase cannot continue with
  train.steps=16: the strategy and its Delta_n are the phase's, so the
  accounting would no longer describe the noise."""
  recipes.run(_config(), str(tmp_path))
  config = _config()
  config.train.steps = 16
  with pytest.raises(errors.ConfigError, match=r"train.steps=16 .*ran with 12"):
    recipes.run(config, str(tmp_path))
