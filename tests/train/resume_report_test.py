"""A resumed run reports what ran (train/as_run.py, PRIVACY.md "Resuming").

The keys it actually used (restored from the checkpoint, whatever the new
config's seeds say), its epsilon at the delta it prints (the ledger's steps
recomputed at the new delta), each phase's sigma and steps as run, and a
refusal naming the field for a change its report could not describe.
"""

import dataclasses
import os
import shutil

import numpy as np
import pytest

from dpjax import errors
from dpjax import privacy
from dpjax import recipes
from dpjax.train import as_run
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import secrets
from tests.train import secrets_test

N, BATCH = 500, 48  # secrets_test's tiny DP-Cap: q = 48 / 500.


def _config(steps, **privacy_fields):
  c = secrets_test._config(**privacy_fields)  # pylint: disable=protected-access
  c.train.steps = steps
  return c


@pytest.fixture(scope="module")
def public_keys_run(tmp_path_factory):
  """2 steps with PUBLIC keys (both seeds 0), sigma 1, delta 1e-3."""
  workdir = str(tmp_path_factory.mktemp("public_keys"))
  recipes.run(_config(2, noise_seed=0, sampling_seed=0, delta=1e-3),
              workdir)
  return workdir


def _resume(start: str, workdir, steps=4, **privacy_fields) -> dict:
  shutil.copytree(start, workdir)
  os.remove(os.path.join(workdir, "results.json"))  # Not ended: resumes.
  return recipes.run(_config(steps, **privacy_fields), str(workdir))


def test_public_keys_then_defaults_reports_public_keys(public_keys_run,
                                                      tmp_path):
  results = _resume(public_keys_run, tmp_path / "r", delta=1e-3)
  assert results["step"] == 4 and results["dp/steps"] == 4
  # The restored keys are the seeded ones, so nothing was secret.
  assert results["secret_randomness"] is False
  assert results["secret_noise"] is False
  assert results["secret_sampling"] is False
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "r"), async_save=False)
  state, meta = ckpt.restore_numpy()
  ckpt.close()
  np.testing.assert_array_equal(state["sampling_key"],
                                secrets.run_key(0, sampling=True))
  assert meta["as_run"]["secret_sampling"] is False
  assert meta["as_run"]["phases"][0]["secret_noise"] is False


def test_another_delta_reports_epsilon_at_the_printed_delta(
    public_keys_run, tmp_path):
  results = _resume(public_keys_run, tmp_path / "r", delta=1e-5)
  assert results["delta"] == 1e-5
  want = privacy.epsilon(1.0, BATCH / N, 4, 1e-5)  # All 4 steps at 1e-5.
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  assert results["epsilon"] > privacy.epsilon(1.0, BATCH / N, 4, 1e-3)


def test_another_sigma_is_reported_as_run(public_keys_run, tmp_path):
  """DP-SGD may continue under another sigma; the report lists both."""
  results = _resume(public_keys_run, tmp_path / "r", delta=1e-3,
                    noise_multiplier=2.0)
  assert results["dp/steps"] == 4
  assert results["dp/noise_multiplier"] == [[1.0, 2], [2.0, 2]]
  assert results["dp/sampling_rate"] == pytest.approx(BATCH / N)
  ledger = privacy.PrivacyLedger(N, 1e-3)
  ledger.record(1.0, BATCH / N, 2)
  ledger.record(2.0, BATCH / N, 2)
  assert results["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)


def test_a_change_the_report_cannot_describe_is_refused(public_keys_run,
                                                        tmp_path):
  with pytest.raises(errors.ConfigError,
                     match=r"config.privacy.l2_clip_norm=2.0 is invalid: "
                     r"phase 'dp' of the checkpoint ran with l2_clip_norm"):
    _resume(public_keys_run, tmp_path / "r", delta=1e-3, l2_clip_norm=2.0)


def test_the_issue_numbers_recomputed_at_the_new_delta():
  """12 steps, sigma 1, q 0.085 saved at delta 1e-3, resumed at 1e-5."""
  saved = privacy.PrivacyLedger(1000, 1e-3)
  saved.record(1.0, 0.085, 12)
  current = privacy.PrivacyLedger(1000, 1e-5, accountant="rdp")
  ledger = as_run.resumed_ledger(saved.to_dict(), current)
  assert (ledger.delta, ledger.accountant, ledger.steps) == (1e-5, "rdp", 12)
  assert ledger.epsilon() == pytest.approx(
      privacy.epsilon(1.0, 0.085, 12, 1e-5, accountant="rdp"), rel=1e-9)
  assert ledger.epsilon() > saved.epsilon()
  empty = privacy.PrivacyLedger(1000, 1e-3).to_dict()
  assert as_run.resumed_ledger(empty, current) is current


@dataclasses.dataclass
class _Plan:
  """What AsRun reads of a phase_plan.PhasePlan."""
  name: str
  private: bool = True
  steps: int = 10
  noise_multiplier: float = 1.0
  per_step_accounting: bool = True  # False: correlated noise (BandMF).
  mechanism = None  # No mechanism-specific facts.
  l2_clip_norm: float = 1.0

  def describe(self):
    out = dict(private=self.private, steps=self.steps, batch_size=8)
    if self.private:
      out.update(noise_multiplier=self.noise_multiplier, sampling_rate=0.1,
                 l2_clip_norm=self.l2_clip_norm)
    return {f"{self.name}/{k}": v for k, v in out.items()}


def test_secret_noise_is_an_and_over_the_phases_entered():
  record = as_run.AsRun(secret_sampling=True)
  plans = [_Plan("public", private=False), _Plan("dp"), _Plan("dp2")]
  record.enter(0, plans[0], None)
  record.enter(1, plans[1], True)
  assert record.secret_noise
  restored = as_run.AsRun.from_dict(record.to_dict(1, 3))
  restored.check(plans, 1, 3)
  assert as_run.public_keys(restored, plans, noise_seed=-1) == []
  # dp2's key will come from a seeded config: it is not secret.
  assert as_run.public_keys(restored, plans, noise_seed=0) == ["noise"]
  restored.enter(2, plans[2], False)
  assert not restored.secret_noise
  out = restored.describe(plans)
  assert (out["public/steps"], out["dp/steps"], out["dp2/steps"]) == (0, 3, 0)


def test_mid_phase_changes_dpsgd_segments_bandmf_refused():
  record = as_run.AsRun(secret_sampling=True)
  record.enter(0, _Plan("dp"), True)
  record.advance(0, 4)
  record.check([_Plan("dp", noise_multiplier=2.0)], 0, 4)
  record.advance(0, 6)
  assert record.describe([_Plan("dp")])["dp/noise_multiplier"] == [
      [1.0, 4], [2.0, 2]]
  with pytest.raises(errors.ConfigError, match="config.privacy.enabled"):
    as_run.AsRun.from_dict(record.to_dict(0, 6)).check(
        [_Plan("dp", private=False)], 0, 6)
  band = as_run.AsRun(secret_sampling=True)
  band.enter(0, _Plan("dp", per_step_accounting=False), True)
  with pytest.raises(errors.ConfigError,
                     match="config.privacy.noise_multiplier=2.0"):
    band.check([_Plan("dp", per_step_accounting=False,
                      noise_multiplier=2.0)], 0, 2)
  with pytest.raises(errors.ConfigError, match="phase 0 is 'train' here"):
    band.check([_Plan("train", per_step_accounting=False)], 0, 2)


def test_a_checkpoint_without_the_record_is_not_called_secret():
  plans = [_Plan("dp")]
  record = as_run.restore(dict(phase=0, phase_step=3), plans)
  assert not record.secret_sampling and not record.secret_noise
  assert record.describe(plans)["dp/steps"] == 3


def test_a_checkpoint_in_a_phase_this_config_lacks_is_refused():
  meta = dict(phase=1, phase_step=2)
  with pytest.raises(errors.ConfigError, match="checkpoint is in phase 1"):
    as_run.restore(meta, [_Plan("dp")])
