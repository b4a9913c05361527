"""Preemption at any moment: SIGTERM during start-up or the final evaluation
exits 0 with a resumable workdir, a checkpoint write cut short (kill -9) is
ignored on resume, and a rerun of an ended run does nothing. (SIGTERM during
training: resume_test.py.)"""

import csv
import json
import os
import shutil
import signal
import time

from tests.train import resume_test

STEPS = 2
# DP-Cap :tiny from resume_test, two steps, one evaluator (zero-shot) so the
# final evaluation takes long enough to be interrupted.
EXTRA = (f"--config.train.steps={STEPS}", "--config.evals.zero_shot.log_steps=0")


def _wait_for(proc, ready, what: str, timeout: float = 300):
  deadline = time.time() + timeout
  while not ready():
    assert proc.poll() is None, (what, proc.communicate()[0][-4000:])
    assert time.time() < deadline, what
    time.sleep(0.1)


def _training_rows(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return [int(r["step"]) for r in csv.DictReader(f)
            if r["name"] == "private/loss"]


def test_sigterm_in_startup_and_final_eval_then_resume_redoes_only_eval(
    tmp_path):
  cache, workdir = str(tmp_path / "jax_cache"), str(tmp_path / "run")
  # Start-up: main() has parsed the config (logged at --verbosity=1), the
  # loop has not started.
  proc = resume_test._start(workdir, cache, *EXTRA, "--verbosity=1")  # pylint: disable=protected-access
  out = []
  _wait_for(proc, lambda: out.append(proc.stdout.readline()) or (
      "config:" in out[-1]), "config logged")
  proc.send_signal(signal.SIGTERM)
  assert "preempted" in resume_test._finish(proc)  # pylint: disable=protected-access
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  # Final evaluation (stalled until the signal; see resume_test.stalled).
  marker = str(tmp_path / "in_final_eval")
  proc = resume_test._start(workdir, cache, *EXTRA,  # pylint: disable=protected-access
                            launcher=resume_test.stalled(marker, "final"))
  _wait_for(proc, lambda: os.path.exists(marker), "final evaluation reached")
  assert os.path.exists(os.path.join(workdir, "export", "params"))
  proc.send_signal(signal.SIGTERM)
  out = resume_test._finish(proc)  # pylint: disable=protected-access
  assert f"preempted at step {STEPS}" in out
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  trained = _training_rows(workdir)
  assert trained and trained[-1] == STEPS

  # A checkpoint write cut short by kill -9 (Orbax writes into a temporary
  # directory and renames it when complete): ignored on resume.
  ckpts = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(ckpts, str(STEPS), "state"),
                  os.path.join(ckpts, f"{STEPS + 1}.orbax-checkpoint-tmp",
                               "state"))
  out = resume_test._finish(resume_test._start(workdir, cache, *EXTRA))  # pylint: disable=protected-access
  assert f"resumed at step {STEPS}" in out
  assert _training_rows(workdir) == trained  # Training was not redone.
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == STEPS and "eval/zero_shot/acc" in results

  # An ended run: nothing to do.
  out = resume_test._finish(resume_test._start(workdir, cache, *EXTRA))  # pylint: disable=protected-access
  assert "already ended" in out


def test_config_error_is_one_line_and_exit_2(tmp_path):
  proc = resume_test._start(str(tmp_path / "bad"), str(tmp_path / "cache"),  # pylint: disable=protected-access
                            "--config.privacy.accountant=prv")
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2, out[-4000:]
  assert out.strip() == ("dpjax: config.privacy.accountant='prv' is invalid: "
                         'use "pld" or "rdp"')
