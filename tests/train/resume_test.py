"""Preemption: SIGTERM -> finish the step, checkpoint, exit 0; rerun resumes.

A run killed with SIGTERM mid-training and restarted with the same command
must end with exactly the parameters, optimizer state, noise key and epsilon
of an uninterrupted run (Grain iterator position and privacy ledger come
back from the checkpoint's meta item).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dpjax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
STEPS = 6

# DP-Cap :tiny, no evaluation, fixed sigma (no calibration), public noise
# seed (reproducible tests only), no periodic checkpoints: the killed run's
# only checkpoint is the one written on SIGTERM.
OVERRIDES = [
    f"--config.train.steps={STEPS}", "--config.train.batch_size=64",
    "--config.train.microbatch_size=32", "--config.train.warmup_steps=1",
    "--config.train.log_every=2", "--config.train.checkpoint_every=100",
    "--config.data.num_examples=1000", "--config.data.eval_num_examples=8",
    "--config.evals.linear_probe=False", "--config.evals.few_shot=False",
    "--config.evals.zero_shot=False", "--config.evals.aro=False",
    "--config.evals.heldout_loss=False", "--config.evals.captions=0",
    "--config.privacy.noise_multiplier=1.0", "--config.privacy.noise_seed=0",
]


def _start(workdir: str, cache_dir: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return subprocess.Popen(
      [sys.executable, "-m", "dpjax.main", "--config=configs/dpcap.py:tiny",
       f"--workdir={workdir}", *OVERRIDES], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logged_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.csv")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [int(r["step"]) for r in csv.DictReader(f) if r["name"] == "epsilon"]


def _finish(proc: subprocess.Popen) -> str:
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-4000:]
  return out


def _state(workdir: str):
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  steps = sorted(ckpt._manager.all_steps())  # pylint: disable=protected-access
  state, meta = ckpt.restore_numpy()
  ckpt.close()
  return steps, state, meta


def test_sigterm_checkpoints_exits_0_and_resume_equals_uninterrupted(
    tmp_path):
  cache = str(tmp_path / "jax_cache")
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  uninterrupted = _start(full, cache)
  proc = _start(killed, cache)
  deadline = time.time() + 300
  while not _logged_steps(killed):  # First log line: mid-training.
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  assert "preempted at step" in out and "rerun the same command" in out
  steps, _, meta = _state(killed)
  assert len(steps) == 1 and 2 <= steps[0] < STEPS, steps
  assert meta["phase_step"] == steps[0]
  assert meta["data"]["next_step"] == steps[0]  # Iterator position saved.
  assert meta["ledger"]["entries"][0]["count"] == steps[0]
  assert not os.path.exists(os.path.join(killed, "results.json"))

  out = _finish(_start(killed, cache))  # The same command resumes.
  assert "resumed at step" in out
  _finish(uninterrupted)

  _, want, want_meta = _state(full)
  _, got, got_meta = _state(killed)
  assert int(got["step"]) == int(want["step"]) == STEPS
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)  # Bitwise: same batches and noise.
  assert got_meta == want_meta  # Ledger, data position, phase.
  with open(os.path.join(full, "results.json")) as f:
    want_results = json.load(f)
  with open(os.path.join(killed, "results.json")) as f:
    got_results = json.load(f)
  assert got_results["step"] == STEPS
  assert got_results["epsilon"] == pytest.approx(want_results["epsilon"],
                                                 rel=1e-12)
  assert got_results["epsilon"] > 0
