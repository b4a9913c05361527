"""The minimal recipe end to end: DP logistic regression on sklearn digits."""

import csv
import os

from configs import dp_linear
from dpjax import recipes


def test_trains_privately_and_evaluates_periodically(tmp_path):
  config = dp_linear.get_config()
  config.train.steps = 60
  config.evals.accuracy.log_steps = 30
  results = recipes.run(config, str(tmp_path))
  assert results["dp/privacy_unit"] == "example"
  assert results["dp/l2_sensitivity"] == config.privacy.l2_clip_norm
  assert 0 < results["epsilon"] <= 2.0 and results["secret_randomness"]
  # Ten classes (chance 0.1): DP-SGD at epsilon 2 learns the digits.
  assert results["eval/accuracy/top1"] > 0.6
  with open(os.path.join(tmp_path, "metrics.csv")) as f:
    steps = [int(r["step"]) for r in csv.DictReader(f)
             if r["name"] == "eval/accuracy/top1"]
  assert steps == [30, 60]
