"""privacy.mechanism="bandmf" in the training loop: the noise head, the
b-cyclic sampler, the ledger (one entry per b steps at rate q*b) and the
config errors."""

import math

import pytest

from configs import dp_linear
from dpjax import errors
from dpjax import privacy
from dpjax import recipes
from dpjax.train import phase_plan


def _config(**privacy_overrides):
  config = dp_linear.get_config()
  config.train.update(dict(steps=12, log_every=4, checkpoint_every=100))
  config.privacy.update(dict(dict(mechanism="bandmf", bands=4),
                             **privacy_overrides))
  config.evals.accuracy.log_steps = -1
  return config


def test_trains_with_correlated_noise_and_its_accounting(tmp_path):
  config = _config()
  results = recipes.run(config, str(tmp_path))
  assert results["mechanism"] == "bandmf" and results["bands"] == 4
  assert results["step"] == 12 and results["secret_randomness"]
  n = config.data.num_train
  sigma, delta = results["dp/noise_multiplier"], results["delta"]
  want = privacy.bandmf.epsilon(sigma, 128 / n, 12, delta, 4)
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  assert results["epsilon"] <= config.privacy.target_epsilon
  # Not DP-SGD's accounting: cyclic sampling amplifies less (rate q*b), so
  # DP-SGD's formula would understate this run's epsilon.
  assert privacy.epsilon(sigma, 128 / n, 12, delta) < results["epsilon"]


def test_ledger_entries_one_per_band():
  plan = phase_plan.resolve_phases(_config(), recipes.build(_config()).phases)[0]
  mechanism = plan.mechanism
  assert mechanism.name == "bandmf" and mechanism.bands == 4
  assert [mechanism.records(0, t) for t in (1, 4, 5, 12)] == [1, 1, 2, 3]
  assert mechanism.records(3, 2) == 1 and mechanism.records(5, 3) == 0
  assert sum(mechanism.records(t, 1) for t in range(12)) == math.ceil(12 / 4)
  ledger = privacy.PrivacyLedger(plan.num_examples, plan.privacy.delta)
  mechanism.record(ledger, 0, 12)  # At rate q*b.
  assert ledger.entries == [dict(
      noise_multiplier=plan.noise_multiplier,
      sampling_rate=4 * plan.sampling_rate, sampling="poisson",
      max_batch_size=None, count=3)]


@pytest.mark.parametrize("overrides,field", [
    (dict(mechanism="dpsgd", bands=2), "privacy.bands=2"),
    (dict(mechanism="blt3"), "privacy.mechanism='blt3'"),
    (dict(min_separation=2), "privacy.min_separation=2"),  # BLT's knob.
    (dict(bands=13), "privacy.bands=13"),
    (dict(bands=12), "privacy.bands=12"),  # batch 128 x 12 > N = 1500.
])
def test_bad_settings_name_the_field(overrides, field):
  with pytest.raises(errors.ConfigError, match=f"config.{field}"):
    recipes.run(_config(**overrides), "/nonexistent-never-written")


def test_resuming_with_another_sigma_is_refused_unless_dpsgd(tmp_path):
  """Correlated noise is accounted for the sigma a phase started with, so a
  resumed BandMF phase refuses a new one; DP-SGD's ledger records each
  step's sigma, so it continues (here to step 16)."""
  for mechanism, bands in (("bandmf", 4), ("dpsgd", 1)):
    workdir = str(tmp_path / mechanism)
    recipes.run(_config(mechanism=mechanism, bands=bands,
                        noise_multiplier=1.0, target_epsilon=50.0), workdir)
    config = _config(mechanism=mechanism, bands=bands, noise_multiplier=2.0,
                     target_epsilon=50.0)
    config.train.steps = 16
    if mechanism == "bandmf":
      with pytest.raises(errors.ConfigError,
                         match=r"privacy.noise_multiplier=2.0 .*ran with 1.0"):
        recipes.run(config, workdir)
    else:
      results = recipes.run(config, workdir)
      assert results["step"] == 16
      n = config.data.num_train
      ledger = privacy.PrivacyLedger(n, results["delta"])
      ledger.record(1.0, 128 / n, 12)
      ledger.record(2.0, 128 / n, 4)
      assert results["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)
