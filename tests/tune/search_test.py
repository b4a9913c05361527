"""`python -m dpjax.tune` end to end on dp_linear: killed, resumed, accounted."""

import json
import os
import stat

import matplotlib
import numpy as np
import pytest

from configs import dp_linear
from dpjax import errors
from dpjax import privacy
from dpjax import recipes
from dpjax.privacy import mechanisms
from dpjax.privacy import tuning
from dpjax.tune import search as tune_run

SPACE = {"train.learning_rate": {"log_uniform": [0.5, 4.0]},
         "privacy.l2_clip_norm": {"log_uniform": [0.3, 3.0]},
         "train.batch_size": {"choice": [64, 128]},
         "trials": {"distribution": "poisson", "mean": 2}}


def _config():
  config = dp_linear.get_config()
  config.train.steps = 8
  config.privacy.noise_multiplier = 1.0  # No calibration (seconds).
  config.train.log_every = 4
  config.train.checkpoint_every = 8
  config.evals.accuracy.log_steps = 8
  return config


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("score", ["private_eval/accuracy/top1",
                                   "private/loss", "epsilon"])
def test_refuses_a_score_that_is_not_a_public_evaluation(score, tmp_path):
  with pytest.raises(errors.ConfigError, match="--score"):
    tune_run.search(_config(), str(tmp_path), SPACE, score=score,
                    k_spec=SPACE["trials"])
  assert not os.listdir(tmp_path)  # Refused before anything ran.


def test_refuses_a_privacy_field_searched_by_range(tmp_path):
  space = dict(SPACE, **{"train.steps": {"log_uniform": [4, 8]}})
  with pytest.raises(errors.ConfigError, match="train.steps"):
    tune_run.search(_config(), str(tmp_path), space,
                    score="eval/accuracy/top1", k_spec=SPACE["trials"])


def test_search_is_killed_resumed_and_accounted(tmp_path, monkeypatch):
  monkeypatch.setattr(tuning.Poisson, "sample", lambda self, rng: 2)
  runs = []
  real_run = recipes.run
  monkeypatch.setattr(recipes, "run", lambda c, w: runs.append(w) or
                      real_run(c, w))
  workdir = str(tmp_path)
  kwargs = dict(score="eval/accuracy/top1", k_spec=SPACE["trials"])
  out = tune_run.search(_config(), workdir, SPACE, stop_after=1, **kwargs)
  assert "stopped" in out and len(runs) == 1
  state = os.path.join(workdir, tune_run.STATE)
  assert _mode(state) == 0o600  # K and the trials' values are secret.
  assert _mode(os.path.join(workdir, "trials")) == 0o700
  assert not os.path.exists(os.path.join(workdir, "tune"))

  matplotlib.use("pdf")  # A caller's (a notebook's) backend...
  out = tune_run.search(_config(), workdir, SPACE, **kwargs)  # Resumes.
  assert matplotlib.get_backend() == "pdf"  # ...is left as it was.
  assert len(runs) == 2 and runs[1].endswith("/1")  # Trial 0 not rerun.
  with open(state) as f:
    values = json.load(f)["trials"]
  assert [t["values"] for t in out["trials"]] == values
  assert all(v["train.batch_size"] in (64, 128) for v in values)
  best = out["released_trial"]
  assert out["trials"][best]["score"] == max(t["score"]
                                             for t in out["trials"])
  # The search costs more than one trial.
  search = out["search"]
  trial_eps = max(t["epsilon"] for t in out["trials"])
  assert 0 < trial_eps < search["epsilon"] < 10 * trial_eps
  assert search["secret_randomness"]
  assert "Theorem 6" in search["how"]
  tune = os.path.join(workdir, "tune")
  assert _mode(os.path.join(tune, "results.json")) == 0o600
  assert _mode(os.path.join(tune, "score_vs_fields.png")) == 0o600
  with open(os.path.join(tune, "export", "search.json")) as f:
    public = json.load(f)
  assert public["values"] == values[best]
  assert public["search"]["epsilon"] == search["epsilon"]
  assert "released_trial" not in public and "k" not in public
  assert os.path.isdir(os.path.join(tune, "export", "params"))

  with pytest.raises(errors.ConfigError, match="space"):  # Same flags only.
    tune_run.search(_config(), workdir, dict(SPACE, **{
        "train.batch_size": {"choice": [64]}}), **kwargs)


def test_target_epsilon_calibrates_each_trial_to_meet_the_search_target(
    tmp_path, monkeypatch):
  """--target_epsilon: each trial's sigma is calibrated (by its mechanism,
  in the loop) to the per-trial epsilon the search picked, and the search's
  reported epsilon is at most the target and close to it. BLT under RDP:
  its sigma calibrates in milliseconds, DP-SGD's in seconds (the search
  calibrates ~6 times; the same search under DP-SGD took 31 s)."""
  monkeypatch.setattr(tuning.TruncatedNegativeBinomial, "sample",
                      lambda self, rng: 2)
  config = _config()
  config.privacy.update(noise_multiplier=-1.0, mechanism="blt",
                        min_separation=2, accountant="rdp")  # Calibrated.
  space = {"train.learning_rate": {"log_uniform": [0.5, 4.0]}}
  k_spec = {"distribution": "truncated_negative_binomial", "eta": 1.0,
            "mean": 1.5}
  out = tune_run.search(config, str(tmp_path), space, k_spec=k_spec,
                        score="eval/accuracy/top1", target_epsilon=2.0)
  search, trial_target = out["search"], out["trial_target_epsilon"]
  assert 0.99 * 2.0 <= search["epsilon"] <= 2.0
  assert "Theorem 2" in search["how"]
  assert trial_target < 2.0 and len(out["trials"]) == 2
  for i, trial in enumerate(out["trials"]):
    with open(tmp_path / "trials" / str(i) / "results.json") as f:
      results = json.load(f)
    assert results["target_epsilon"] == trial_target
    assert results["dp/noise_multiplier"] > 0  # Calibrated, not -1.
    assert 0.95 * trial_target <= trial["epsilon"] <= trial_target


_KNOBS = {"bandmf": dict(bands=4), "blt": dict(min_separation=2),
          "truncated_poisson": dict(max_batch_size=300)}
N, DELTA = 1500, 1500 ** -1.1  # dp_linear's private images, default delta.


def _mechanism(name, batch, accountant):
  """The mechanism of dp_linear's phase, built by hand (sigma 1, T = 8)."""
  return mechanisms.get(name)(1.0, batch / N, 8, N, DELTA, accountant,
                              **_KNOBS.get(name, {}))


def _has_rdp(name) -> bool:
  ledger = privacy.PrivacyLedger(N, DELTA, "pld")
  _mechanism(name, 128, "pld").record(ledger, 0, 8)
  return tuning.supports_rdp(ledger.dp_event())


@pytest.mark.parametrize("name", mechanisms.NAMES)
def test_predictor_is_each_mechanisms_own_accounting(name, tmp_path):
  """A trial's predicted curve is its mechanism's own accounting (BandMF's
  or BLT's, not DP-SGD's formula); a mechanism without an RDP curve is
  refused, naming the field, before any trial runs."""
  config = _config()
  config.privacy.update(mechanism=name, **_KNOBS.get(name, {}))
  if not _has_rdp(name):
    with pytest.raises(errors.ConfigError,
                       match=rf"privacy.mechanism='{name}'.*PLD only"):
      tune_run.search(config, str(tmp_path), SPACE, k_spec=SPACE["trials"],
                      score="eval/accuracy/top1")
    assert not os.listdir(tmp_path)
    return
  config.privacy.accountant = "rdp"  # As the mechanism's epsilon below.
  predictor = tune_run.Predictor(config)
  for batch in (64, 128):
    curve = predictor.curve({"train.batch_size": batch}, None)
    want = _mechanism(name, batch, "rdp").epsilon()
    assert tuning.rdp_to_epsilon(tuning.ORDERS, curve, DELTA)[0] == (
        pytest.approx(want, rel=0.02))  # Order grids differ.
    if name != "dpsgd":  # Tells the mechanisms apart.
      assert abs(want - _mechanism("dpsgd", batch, "rdp").epsilon()) > (
          0.2 * want)


def test_predictor_calibrates_sigma_with_the_mechanism():
  config = _config()
  config.privacy.update(mechanism="blt", accountant="rdp",
                        noise_multiplier=-1.0, **_KNOBS["blt"])
  curve = tune_run.Predictor(config).curve({}, 1.0)
  sigma = _mechanism("blt", 128, "rdp").calibrate(1.0)
  # BLT is one Gaussian mechanism: RDP lambda / (2 sigma^2).
  np.testing.assert_allclose(
      curve, np.asarray(tuning.ORDERS) / (2 * sigma ** 2), rtol=1e-6)
  assert 0.99 <= tuning.rdp_to_epsilon(tuning.ORDERS, curve, DELTA)[0] <= 1.0


def test_refuses_trials_without_dp(tmp_path):
  config = _config()
  config.privacy.enabled = False
  with pytest.raises(errors.ConfigError, match="privacy.enabled"):
    tune_run.search(config, str(tmp_path), SPACE, k_spec=SPACE["trials"],
                    score="eval/accuracy/top1")
  assert not os.listdir(tmp_path)
