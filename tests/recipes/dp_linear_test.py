"""The minimal recipe end to end: DP logistic regression on sklearn digits."""

import csv
import os

from configs import dp_linear
from dpjax import recipes


def test_trains_privately_and_evaluates_periodically(tmp_path):
  config = dp_linear.get_config()
  config.train.steps = 60
  config.train.ema_decay = 0.9
  config.evals.accuracy.log_steps = 30
  results = recipes.run(config, str(tmp_path))
  assert results["dp/privacy_unit"] == "example"
  assert results["dp/l2_sensitivity"] == config.privacy.l2_clip_norm
  assert 0 < results["epsilon"] <= 2.0 and results["secret_randomness"]
  # Ten classes (chance 0.1): DP-SGD at epsilon 2 learns the digits.
  assert results["eval/accuracy/top1"] > 0.6
  with open(os.path.join(tmp_path, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  for name in ("eval/accuracy/top1", "eval_ema/accuracy/top1"):
    assert [int(r["step"]) for r in rows if r["name"] == name] == [30, 60]
  # The EMA of the DP params (post-processing) is evaluated and exported
  # beside them.
  assert results["eval_ema/accuracy/top1"] > 0.6
  assert results["eval_ema/accuracy/ce"] != results["eval/accuracy/ce"]
  for name in ("params", "ema_params"):
    assert os.path.isdir(os.path.join(tmp_path, "export", name))
