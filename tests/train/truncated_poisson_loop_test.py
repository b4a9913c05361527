"""privacy.mechanism="truncated_poisson" in the training loop: every step
reads exactly max_batch_size rows, the ledger's truncated entries are the
run's epsilon, and a run resumed from a checkpoint (secret keys restored)
ends bit for bit where the uninterrupted run did. (In-process on dp_linear:
tests/train/resume_test.py does the SIGTERM path for BandMF and BLT.)"""

import os
import shutil

import jax
import numpy as np
import pytest

from configs import dp_linear
from dpjax import privacy
from dpjax import recipes
from tests.train import resume_test


def _config():
  config = dp_linear.get_config()
  config.train.update(dict(steps=6, log_every=2, checkpoint_every=2,
                           keep_checkpoints=10))
  config.privacy.update(dict(mechanism="truncated_poisson",
                             max_batch_size=160, noise_multiplier=1.0))
  config.evals.accuracy.log_steps = -1
  return config


def test_fixed_rows_truncated_accounting_and_bitwise_resume(tmp_path):
  full, replay = str(tmp_path / "full"), str(tmp_path / "replay")
  results = recipes.run(_config(), full)
  assert results["mechanism"] == "truncated_poisson"
  assert results["secret_randomness"] and results["step"] == 6
  n = _config().data.num_train
  want = privacy.epsilon(1.0, 128 / n, 6, results["delta"],
                         sampling="truncated_poisson", num_examples=n,
                         max_batch_size=160)
  assert results["epsilon"] == pytest.approx(want, rel=1e-9)
  assert results["epsilon"] >= privacy.epsilon(1.0, 128 / n, 6,
                                               results["delta"])

  shutil.copytree(os.path.join(full, "checkpoints", "2"),
                  os.path.join(replay, "checkpoints", "2"))
  again = recipes.run(_config(), replay)
  _, want_state, want_meta = resume_test._state(full)  # pylint: disable=protected-access
  _, got_state, got_meta = resume_test._state(replay)  # pylint: disable=protected-access
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(a, b)  # Same batches and noise.
  assert got_meta == want_meta
  assert again["epsilon"] == pytest.approx(results["epsilon"], rel=1e-12)
