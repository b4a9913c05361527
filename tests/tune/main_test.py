"""`python -m dpjax.tune` from the command line on a tiny recipe (DP-Cap)."""

import json
import os
import subprocess
import sys

from configs import dpcap as dpcap_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SCORE = "eval/caption/heldout_loss"  # On the public held-out captions.
# Each trial: 2 DP-SGD steps of the tiny model, one held-out evaluation.
OVERRIDES = [
    "--config.train.steps=2", "--config.train.warmup_steps=0",
    "--config.train.batch_size=32", "--config.train.microbatch_size=32",
    "--config.train.log_every=100", "--config.data.num_examples=500",
    "--config.data.eval_num_examples=8",
    "--config.privacy.noise_multiplier=1.0"] + [
        f"--config.evals.{k}.log_steps=-1"  # Off, but the score's.
        for k in dpcap_config.get_config("tiny").evals if k != "heldout_loss"]


def _tune(workdir, space) -> str:
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "-m", "dpjax.tune", "--config=configs/dpcap.py:tiny",
       f"--workdir={workdir}", f"--space={space}", f"--score={SCORE}",
       "--mode=min", "--k_distribution=truncated_negative_binomial",
       "--k_eta=1", "--k_gamma=0.95", *OVERRIDES],  # Geometric: E[K] ~ 1.05.
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_search_on_a_tiny_recipe_runs_reports_and_resumes(tmp_path):
  space = tmp_path / "space.json"
  space.write_text(json.dumps(
      {"train.learning_rate": {"log_uniform": [1e-4, 1e-3]}}))
  workdir = tmp_path / "search"
  printed = _tune(workdir, space)
  with open(workdir / "tune" / "results.json") as f:
    out = json.load(f)
  search, trials = out["search"], out["trials"]
  assert "Theorem 2" in search["how"] and search["secret_randomness"]
  assert 0 < max(t["epsilon"] for t in trials) < search["epsilon"]
  assert f"search: epsilon {search['epsilon']:.4g}" in printed
  assert os.path.isdir(workdir / "tune" / "export" / "params")
  first = workdir / "trials" / "0" / "results.json"
  mtime = os.stat(first).st_mtime_ns
  # The same command resumes: nothing is rerun, the same epsilon reported.
  assert f"search: epsilon {search['epsilon']:.4g}" in _tune(workdir, space)
  assert os.stat(first).st_mtime_ns == mtime
