"""Preemption: SIGTERM -> finish the step, checkpoint, exit 0; rerun resumes.

Runs keep their SECRET noise and sampling keys (the default: OS entropy;
here with a parameter EMA and BandMF or BLT noise, whose state resumes too;
truncated Poisson's resume is tests/train/truncated_poisson_loop_test.py):
the keys come back from the checkpoint, so a run resumed from a checkpoint of
an uninterrupted run ends with exactly its parameters, optimizer state, keys
and epsilon (Grain iterator position and privacy ledger come back from the
checkpoint's meta item), and a run killed with SIGTERM exits 0 and resumes
with the keys it was killed with.
"""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import dpcap as dpcap_config
from dpjax.train import checkpoint as ckpt_lib
from tests.train import secrets_test

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
STEPS = 6

# DP-Cap :tiny, no evaluation, fixed sigma (no calibration), secret keys,
# no periodic checkpoints: the killed run's only checkpoint is the one
# written on SIGTERM.
OVERRIDES = [
    f"--config.train.steps={STEPS}", "--config.train.batch_size=64",
    "--config.train.microbatch_size=32", "--config.train.warmup_steps=1",
    "--config.train.log_every=2", "--config.train.checkpoint_every=100",
    "--config.data.num_examples=1000", "--config.data.eval_num_examples=8",
    "--config.privacy.noise_multiplier=1.0",
    # The EMA and the correlated noise's buffers resume bit for bit too.
    "--config.train.ema_decay=0.9",
] + [f"--config.evals.{k}.log_steps=-1"  # off.
     for k in dpcap_config.get_config("tiny").evals]
MECHANISMS = {  # BandMF (b=2), BLT (3 buffers, min separation 2).
    "bandmf": ("--config.privacy.mechanism=bandmf",
               "--config.privacy.bands=2"),
    "blt": ("--config.privacy.mechanism=blt",
            "--config.privacy.min_separation=2",
            "--config.privacy.blt_buffers=3"),
}


def stalled(marker: str, at: int | str) -> tuple[str, ...]:
  """A launcher for `_start`: dpjax.main stalled where a SIGTERM must land.

  At training step `at` (after its step, before its checkpoint decision) or
  at the "final" evaluation, it touches `marker` and waits: a real run can
  pass either point before a signal arrives on a fast machine. The final
  evaluation waits in a sleep that SIGTERM interrupts; training (where
  SIGTERM only sets a flag) waits until the test deletes `marker`.
  """
  return ("-c", f"""
import os, pathlib, sys, time
from absl import app
from dpjax import main
from dpjax.train import loop
marker, at, evaluate = pathlib.Path({marker!r}), {at!r}, loop._evaluate
def stalled(run, state, writer, step, periodic=False):
  if (not periodic and at == "final") or (periodic and step == at):
    marker.touch()
    while marker.exists():
      time.sleep(0.05)
  return evaluate(run, state, writer, step, periodic)
loop._evaluate = stalled
app.run(main.main)
""")


def _start(workdir: str, cache_dir: str, *extra: str,
           launcher: tuple[str, ...] = ("-m", "dpjax.main"),
           mechanism: str = "bandmf") -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return subprocess.Popen(
      [sys.executable, *launcher, "--config=configs/dpcap.py:tiny",
       f"--workdir={workdir}", *OVERRIDES, *MECHANISMS[mechanism], *extra],
      cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_sigterm_exits_0_and_resume_equals_uninterrupted_with_secret_keys(
    tmp_path, mechanism):
  cache = str(tmp_path / "jax_cache")
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  start = functools.partial(_start, mechanism=mechanism)
  uninterrupted = start(full, cache, "--config.train.checkpoint_every=2",
                        "--config.train.keep_checkpoints=10")
  marker = str(tmp_path / "at_step_2")
  proc = start(killed, cache, launcher=stalled(marker, 2))
  deadline = time.time() + 300
  while not os.path.exists(marker):  # Mid-training: step 2 done.
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    assert time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  lines = []
  while "SIGTERM" not in (lines[-1] if lines else ""):  # Handler ran.
    lines.append(proc.stdout.readline())
    assert lines[-1], "".join(lines)[-4000:]
  os.remove(marker)
  out = "".join(lines) + _finish(proc)
  assert "preempted at step" in out and "rerun the same command" in out
  steps, at_kill, meta = _state(killed)
  assert steps == [2], steps
  assert meta["phase_step"] == steps[0]
  assert meta["data"]["next_step"] == steps[0]  # Iterator position saved.
  entry = meta["ledger"]["entries"][0]
  if mechanism == "bandmf":  # One ledger entry per 2 steps (at rate 2q).
    assert entry["count"] == -(-steps[0] // 2)
  else:  # BLT: one Gaussian entry, rho growing with every step.
    assert entry["kind"] == "gaussian" and entry["count"] == steps[0]
    assert 0 < entry["rho"] < 1.0
  assert not os.path.exists(os.path.join(killed, "results.json"))
  _finish(uninterrupted)

  # Resume a copy of the uninterrupted run's step-2 checkpoint: its secret
  # keys come back, so it must end exactly where the uninterrupted run did.
  replay = str(tmp_path / "replay")
  shutil.copytree(os.path.join(full, "checkpoints", "2"),
                  os.path.join(replay, "checkpoints", "2"))
  resumed = start(killed, cache)  # The same command resumes.
  out = _finish(start(replay, cache))
  assert "resumed at step 2" in out
  assert "resumed at step" in _finish(resumed)

  _, want, want_meta = _state(full)
  _, got, got_meta = _state(replay)
  assert int(got["step"]) == int(want["step"]) == STEPS
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)  # Bitwise: same batches and noise.
  assert got_meta == want_meta  # Ledger, data position, phase.
  assert os.path.isdir(os.path.join(replay, "export", "ema_params"))
  results = []
  for workdir in (full, replay, killed):
    with open(os.path.join(workdir, "results.json")) as f:
      results.append(json.load(f))
    assert results[-1]["secret_randomness"] is True
    assert results[-1]["step"] == STEPS
  assert results[1]["epsilon"] == pytest.approx(results[0]["epsilon"],
                                                rel=1e-12)
  assert results[0]["epsilon"] > 0

  # The killed run finished with the keys it was killed with, and they are
  # secret: not those of the other run with the same config.
  _, end, _ = _state(killed)
  assert int(end["step"]) == STEPS
  for key in (secrets_test.noise_key, lambda s: s["sampling_key"]):
    np.testing.assert_array_equal(key(end), key(at_kill))
    assert not np.array_equal(key(end), key(want))
