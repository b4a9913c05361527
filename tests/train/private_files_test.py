"""Secrets at rest: checkpoints/ (both secret keys) and private_* files are
owner-only (folders 0700, files 0600) whatever the umask; the end-of-run
bad-record log line labels its count as a private value."""

import json
import logging
import os
import stat
import types

import jax.numpy as jnp
import numpy as np
import pytest

from configs import dp_linear
from dpjax import private_files
from dpjax import recipes
from dpjax.data import bad_records
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import report
from dpjax.train import metrics

UMASKS = [0o022, 0o000]


@pytest.fixture(params=UMASKS, ids=lambda u: f"umask{u:03o}")
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.lstat(path).st_mode)


def _open_to_others(root: str) -> list[str]:
  """Every entry at or below `root` that group or others can access."""
  out = [root] if _mode(root) & 0o077 else []
  for d, dirs, files in os.walk(root):
    out += [os.path.join(d, n) for n in dirs + files
            if _mode(os.path.join(d, n)) & 0o077]
  return out


def _assert_owner_only(root: str) -> None:
  assert _mode(root) == 0o700
  assert not _open_to_others(root)
  for d, dirs, files in os.walk(root):
    for n in dirs:
      assert _mode(os.path.join(d, n)) == 0o700, os.path.join(d, n)
    for n in files:
      assert _mode(os.path.join(d, n)) == 0o600, os.path.join(d, n)


def test_private_text_and_dir_are_owner_only(umask, tmp_path):
  path = str(tmp_path / "private_x.json")
  private_files.write_private_text(path, "secret")
  assert _mode(path) == 0o600 and open(path).read() == "secret"
  # A file left world-readable by an older version is restricted before
  # the new text goes in.
  os.chmod(path, 0o644)
  private_files.write_private_text(path, "again")
  assert _mode(path) == 0o600 and open(path).read() == "again"
  d = str(tmp_path / "a" / "checkpoints")
  private_files.make_private_dir(d)
  assert _mode(d) == 0o700
  os.chmod(d, 0o755)  # A run started before the rule: fixed on reuse.
  private_files.make_private_dir(d)
  assert _mode(d) == 0o700


def test_async_checkpoints_are_owner_only(umask, tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2, async_save=True)
  root = str(tmp_path / "checkpoints")
  # The parent is 0700 before Orbax writes anything: whatever modes Orbax
  # gives the files of a save in flight, nobody else can reach them.
  assert _mode(root) == 0o700
  state = {"key": jnp.asarray([0xDEADBEEF, 0xCAFEF00D], jnp.uint32),
           "w": jnp.ones((3,))}
  for step in (1, 2, 3):
    ckpt.save(step, state, {"phase": 0})
    assert _mode(root) == 0o700
  ckpt.wait()
  _assert_owner_only(root)
  assert sorted(os.listdir(root)) == ["2", "3"]
  ckpt.close()
  _assert_owner_only(root)


def _tiny_run(workdir: str) -> dict:
  c = dp_linear.get_config()
  c.train.update(steps=2, log_every=1, checkpoint_every=1)
  c.evals.accuracy.log_steps = 0
  c.privacy.update(noise_seed=0, sampling_seed=0)
  return recipes.run(c, workdir)


def test_a_real_run_keeps_its_secrets_owner_only(umask, tmp_path):
  workdir = str(tmp_path / "run")
  results = _tiny_run(workdir)
  assert results["step"] == 2
  root = os.path.join(workdir, "checkpoints")
  assert os.listdir(root)  # Something was saved, and ...
  _assert_owner_only(root)  # ... nobody else can read any of it.
  assert _mode(os.path.join(workdir, bad_records.BAD_RECORDS_FILE)) == 0o600
  # The saved state does hold the keys (so the modes matter).
  state, _ = ckpt_lib.Checkpointer(workdir).restore_numpy()
  assert "sampling_key" in state


def test_bucket_paths_are_left_to_the_bucket():
  assert not private_files.is_local("gs://bucket/run/checkpoints")
  assert private_files.is_local("runs/run/checkpoints")


def _fake_run(private: bool) -> types.SimpleNamespace:
  phase = types.SimpleNamespace(name="dp", private=private, source=list(range(10)))
  tally = bad_records.BadRecordTally()
  tally.add("dp", {"bad_index": np.array([3, -1, 7, 3]),
                   "bad_reason": np.array([1, 0, 2, 1])})
  return types.SimpleNamespace(task=types.SimpleNamespace(phases=[phase]),
                               plans=[phase], bad=tally, startup_bad={})


@pytest.mark.parametrize("private", [True, False])
def test_bad_record_count_is_logged_as_a_private_value(private, tmp_path,
                                                       caplog):
  old = os.umask(0)
  try:
    writer = metrics.MetricWriter(str(tmp_path), total_steps=1)
    caplog.set_level(logging.INFO)
    report.write_bad_records(_fake_run(private), str(tmp_path), writer, 1)  # pylint: disable=protected-access
    writer.close()
  finally:
    os.umask(old)
  path = tmp_path / bad_records.BAD_RECORDS_FILE
  assert _mode(path) == 0o600
  assert json.loads(path.read_text())["phases"]["dp"]["bad_records"] == 2
  prefix = "private/" if private else "nonprivate/"
  lines = [r.getMessage() for r in caplog.records if "bad" in r.getMessage()]
  assert len(lines) == 1
  # Named like the metric, and (when private) said to be not DP.
  assert lines[0].startswith(f"{prefix}bad_records=2 (3 draws)")
  assert ("NOT differentially private" in lines[0]) == private
  assert metrics.read_csv(str(tmp_path)) == {f"{prefix}bad_records":
                                             [(1, 2.0)]}


def test_prepare_writes_its_dropped_records_list_owner_only(tmp_path):
  from dpjax.prepare import run  # pylint: disable=g-import-not-at-top
  from dpjax.prepare import stage  # pylint: disable=g-import-not-at-top
  from tests.prepare import fake_inputs  # pylint: disable=g-import-not-at-top
  imgs = {f"{i}.png": fake_inputs.encode(fake_inputs.pixels(i))
          for i in range(2)}
  fake_inputs.folder(tmp_path / "f", [
      {"file": f"{i}.png", "caption": f"c{i}"} for i in range(2)] + [
          {"file": "gone.png", "caption": "missing file"}], imgs)
  old = os.umask(0)
  try:
    m = run.prepare(str(tmp_path / "f"), "folder", str(tmp_path / "out"),
                    stage.Options(), records_per_shard=2)
  finally:
    os.umask(old)
  assert m["dropped"] == {"missing_image": 1}
  assert _mode(tmp_path / "out" / "dropped.jsonl") == 0o600
