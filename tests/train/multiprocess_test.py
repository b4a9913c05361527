"""Two processes x 4 CPU devices (jax.distributed, gloo) == 1 process x 8.

launch/local_2proc.sh starts two `python -m dpjax.main` processes that
coordinate over localhost; each reads only its half of every Poisson batch.
Their noise and sampling keys are secret OS entropy drawn on process 0 and
broadcast, so both processes sample the same batches and add the same noise.
The two-process run's step-2 checkpoint, resumed (as after a kill) both on
one process with 8 devices and on two processes again, must end step 3 with
the uninterrupted two-process run's parameters and keys (up to float
summation order of the cross-process all-reduce): the secret keys come back
from the checkpoint, and a process that had drawn its own keys would have
loaded rows of another batch.
"""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import dpcap as dpcap_config
from dpjax.train import checkpoint as ckpt_lib
from tests.train import secrets_test

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# DP-Cap :tiny, 3 steps, no evaluation, fixed sigma (no calibration),
# secret keys, checkpoints at steps 2 and 3.
OVERRIDES = [
    "--config.train.steps=3", "--config.train.batch_size=64",
    "--config.train.microbatch_size=32", "--config.train.warmup_steps=1",
    "--config.train.log_every=100", "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=10",
    "--config.data.num_examples=1000", "--config.data.eval_num_examples=8",
    "--config.privacy.noise_multiplier=1.0",
] + [f"--config.evals.{k}.log_steps=-1"  # off.
     for k in dpcap_config.get_config("tiny").evals]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(cache_dir: str, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env.update(extra)
  return env


def _params(workdir: str):
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  state, meta = ckpt.restore_numpy()
  ckpt.close()
  return state, meta


def _adam_mu(opt_state):
  """Adam's first moment, wherever the optimizer chain nests it."""
  if isinstance(opt_state, dict) and "mu" in opt_state:
    return opt_state["mu"]
  children = (opt_state.values() if isinstance(opt_state, dict) else
              opt_state if isinstance(opt_state, (list, tuple)) else ())
  for child in children:
    if (mu := _adam_mu(child)) is not None:
      return mu
  return None


def _two_processes(workdir: str, cache: str) -> subprocess.Popen:
  return subprocess.Popen(
      ["bash", os.path.join(REPO, "launch", "local_2proc.sh"),
       "configs/dpcap.py:tiny", workdir, *OVERRIDES],
      cwd=REPO, env=_env(cache, PYTHON=sys.executable,
                         PORT=str(_free_port())),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _logs(workdir: str) -> str:
  logs = ""
  for p in (0, 1):
    with open(os.path.join(workdir, "logs", f"process_{p}.log")) as f:
      logs += f.read()
  return logs


def test_two_processes_match_one_process_with_8_devices(tmp_path):
  cache = str(tmp_path / "jax_cache")
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  again = str(tmp_path / "two_again")
  multi = _two_processes(two, cache)
  out_multi = multi.communicate(timeout=300)[0]
  logs = _logs(two)
  assert multi.returncode == 0, out_multi + logs[-6000:]
  assert "process 1 of 2, 4 local / 8 global devices" in logs

  # Resume the step-2 checkpoint (as after a kill) on one process with 8
  # devices and, at the same time, on two processes again.
  for workdir in (one, again):
    shutil.copytree(os.path.join(two, "checkpoints", "2"),
                    os.path.join(workdir, "checkpoints", "2"))
  single = subprocess.Popen(
      [sys.executable, "-m", "dpjax.main", "--config=configs/dpcap.py:tiny",
       f"--workdir={one}", *OVERRIDES], cwd=REPO,
      env=_env(cache, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  multi_again = _two_processes(again, cache)
  out_single = single.communicate(timeout=300)[0]
  out_again = multi_again.communicate(timeout=300)[0]
  assert single.returncode == 0, out_single[-3000:]
  assert "resumed at step 2" in out_single
  assert multi_again.returncode == 0, out_again + _logs(again)[-6000:]
  assert "resumed at step 2" in _logs(again)

  s2, meta2 = _params(two)
  for other in (one, again):
    s1, meta1 = _params(other)
    assert int(s2["step"]) == int(s1["step"]) == 3
    assert meta2["ledger"] == meta1["ledger"]  # Same privacy account.
    assert meta2["data"] == meta1["data"]
    # Restored, not redrawn.
    for key in (secrets_test.noise_key, lambda s: s["sampling_key"]):
      np.testing.assert_array_equal(key(s2), key(s1))
      assert np.asarray(key(s2)).any()
    assert jax.tree.structure(s2) == jax.tree.structure(s1)
    # Params and Adam moments identical up to the summation order of the
    # cross-process gradient all-reduce (measured ~1e-8).
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s1)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # ... which is far below what the noisy steps moved (Adam's mu).
  mu = jax.tree.leaves(_adam_mu(s2["opt_state"]))
  assert mu
  assert max(float(np.max(np.abs(m))) for m in mu) > 1e-3
  assert os.path.exists(os.path.join(two, "results.json"))  # process 0.
  assert os.path.exists(os.path.join(again, "results.json"))
