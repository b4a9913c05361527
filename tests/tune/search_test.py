"""`python -m dpjax.tune` end to end on dp_linear: killed, resumed, accounted."""

import json
import os
import stat

import pytest

from configs import dp_linear
from dpjax import errors
from dpjax import recipes
from dpjax.tune import search as tune_run
from dpjax.privacy import tuning

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

  out = tune_run.search(_config(), workdir, SPACE, **kwargs)  # Resumes.
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
