"""Bad records through the training loop (DP-Cap on a folder / ArrayRecord
of 41 images, four of them bad: see tests/data/bad_data.py).

Checked: the bad rows contribute exactly zero to the clipped sum; with
on_bad_record=skip (and always for sources too large to validate) the run
finishes with N unchanged, the end-of-run file and the private counter are
right, nothing written during training mentions them, and a resumed run
keeps the count; with the default "error" the command line stops before
training, lists every problem and exits 2.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import dpcap as dpcap_config
from dpjax import data as data_lib
from dpjax import recipes
from dpjax.data import bad_records
from dpjax.data import clients
from dpjax.data import pipeline
from dpjax.data import sources
from dpjax.data import tokenizer
from dpjax.data import transforms
from dpjax.data import users as users_lib
from dpjax.prepare import records as records_lib
from dpjax.train import metrics
from dpjax.train import step as step_lib
from tests.data import bad_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
N = 41


def test_bad_rows_contribute_exactly_zero_to_the_clipped_sum(tmp_path):
  spec, reasons = bad_data.make("folder", str(tmp_path), N)
  src = sources.make_source(spec)
  ts = transforms.image_pipeline(8, tokenizer=tokenizer.shapes_tokenizer(),
                                 max_len=12)
  el = next(pipeline.poisson_batches(
      src, sampling_rate=1.0, global_microbatch=16, seed=1, num_steps=1,
      transforms=ts, process_index=0, process_count=1))

  def loss_fn(params, example):
    x = example["image"].reshape(-1)
    t = example["tokens"].astype(jnp.float32) / 10.0
    return jnp.tanh(params["w"] @ x) ** 2 + jnp.sum(params["v"] * t) ** 2

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=192), jnp.float32) / 10,
            "v": jnp.asarray(rng.normal(size=12), jnp.float32)}
  sum_fn = jax.jit(step_lib.private_sum_fn(loss_fn, 0.5))

  def clipped_sum(example, mask):
    total, count = jax.tree.map(jnp.zeros_like, params), 0.0
    for m in range(mask.shape[0]):
      g, aux = sum_fn(params, jax.tree.map(lambda x, m=m: x[m], example),
                      mask[m])
      total = jax.tree.map(jnp.add, total, g)
      count += float(aux["count"])
    return total, count

  with_bad, count = clipped_sum(el["example"], el["mask"])
  assert count == N - len(reasons)
  # The same step without the bad records: only the good rows, all real.
  rows = pipeline.RowLoader(src, tuple(ts), 1)
  good = [rows.load(i, 0) for i in range(N) if i not in reasons]
  good += [good[0]] * (48 - len(good))
  stacked = {k: np.stack([r[k] for r in good]).reshape(3, 16, -1)
             for k in ("image", "tokens")}
  stacked["image"] = stacked["image"].reshape(3, 16, 8, 8, 3)
  mask = (np.arange(48) < N - len(reasons)).astype(np.float32).reshape(3, 16)
  without, _ = clipped_sum(stacked, mask)
  for a, b in zip(jax.tree.leaves(with_bad), jax.tree.leaves(without)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Whatever a bad row holds, it adds exactly nothing.
  noisy = dict(el["example"])
  bad = el["bad_index"] >= 0
  noisy["image"] = np.where(bad[..., None, None, None],
                            rng.normal(size=el["example"]["image"].shape),
                            el["example"]["image"]).astype(np.float32)
  again, _ = clipped_sum(noisy, el["mask"])
  for a, b in zip(jax.tree.leaves(with_bad), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def _config(source: str, steps: int, **overrides):
  """DP-Cap :tiny on `source` (16x16): every record drawn every step
  (q = 1), fixed seeds, no evaluations."""
  c = dpcap_config.get_config("tiny")
  c.model.encoder_depth = 1  # compiles faster.
  c.data.update(source=source, image_size=16, num_examples=N,
                eval_num_examples=16)
  c.train.update(steps=steps, batch_size=N, microbatch_size=32,
                 warmup_steps=0, log_every=1, checkpoint_every=2)
  c.evals = ml_collections.ConfigDict()  # no evaluation.
  c.privacy.update(noise_seed=0, sampling_seed=0, noise_multiplier=1.0)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.parametrize("kind,overrides", [
    # A small folder: validated at start; skip makes the bad rows zero.
    ("folder", {"data.on_bad_record": "skip"}),
    # "Large" (above the threshold): never validated in full, so the
    # default on_bad_record=error never fires; bad rows are zero rows.
    ("arrayrecord", {"data.validate_max_records": 10}),
])
def test_run_finishes_and_reports_bad_records_only_at_the_end(
    kind, overrides, tmp_path, caplog):
  spec, reasons = bad_data.make(kind, str(tmp_path / "data"), N)
  workdir = str(tmp_path / "run")
  caplog.set_level(logging.INFO)
  if kind == "folder":
    # Two steps, then a resumed run to three: the count survives.
    recipes.run(_config(spec, 2, **overrides), workdir)
    first = json.load(open(os.path.join(workdir,
                                        bad_records.BAD_RECORDS_FILE)))
    assert [r["draws"] for r in first["phases"]["dp"]["records"]] == [2] * 4
  results = recipes.run(_config(spec, 3, **overrides), workdir)
  assert results["step"] == 3
  assert results["dp/num_examples"] == N  # N (and so epsilon) unchanged.
  assert not [k for k in results if "bad" in k]  # results.json is public.

  report = json.load(open(os.path.join(workdir, bad_records.BAD_RECORDS_FILE)))
  assert "PRIVATE" in report["WARNING"]
  dp = report["phases"]["dp"]
  assert dp["private"] and dp["bad_records"] == 4 and dp["bad_draws"] == 12
  want = [{"index": i, "reason": reasons[i], "draws": 3} for i in bad_data.BAD]
  if kind == "folder":
    for w in want:
      w["name"] = bad_data.file_name(w["index"])
    assert [r["index"] for r in dp["found_at_startup"]] == list(bad_data.BAD)
  else:
    assert "found_at_startup" not in dp
  assert dp["records"] == want

  logged = metrics.read_csv(workdir)
  bad_metrics = {k: v for k, v in logged.items() if "bad" in k}
  # Once per run, at its last step; nothing at the steps that drew them.
  ends = [2, 3] if kind == "folder" else [3]
  assert bad_metrics == {"private/bad_records": [(s, 4.0) for s in ends]}
  per_step = {}
  for name, values in logged.items():
    for s, _ in values:
      per_step.setdefault(s, set()).add(name)
  assert per_step[1] == per_step[3] - {"private/bad_records"}
  # No log line names a bad record, or says when one was drawn.
  for record in caplog.records:
    text = record.getMessage()
    assert not any(bad_data.file_name(i) in text for i in bad_data.BAD)
    assert "step" not in text or "bad" not in text


def test_command_line_lists_every_problem_and_exits_2(tmp_path):
  spec, reasons = bad_data.make("folder", str(tmp_path / "data"), N)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "dpjax.main",
         "--config=configs/dpcap.py:tiny", f"--workdir={tmp_path / 'run'}",
         f"--config.data.source={spec}", "--config.data.image_size=16",
         "--config.data.num_examples=41", "--config.train.batch_size=8",
         "--config.train.steps=2", "--config.train.warmup_steps=0"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = proc.stderr
  assert "4 of 41 records" in err
  for i, reason in reasons.items():
    assert f"record {i} ({bad_data.file_name(i)}): {reason}" in err
  assert "--config.data.on_bad_record=skip" in err
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_dp_fedemb_a_user_whose_records_all_fail_contributes_zero():
  import optax  # pylint: disable=g-import-not-at-top
  from dpjax.privacy import user_level  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  recs = []
  for u in range(6):  # user 102: both images corrupt; user 104: one.
    for j in range(2):
      bad = u == 2 or (u == 4 and j == 1)
      image = records_lib.encode_image(rng.integers(0, 256, (4, 4, 3)))
      recs.append({"image": b"corrupt" if bad else image, "label": u,
                   "user": 100 + u})
  # A record that cannot even be read when users are indexed joins no
  # user (like a record the data preparation skipped): not in N.
  src = users_lib.UserKeyedSource(_Unreadable(recs), "user")
  assert src.num_users == 6
  ts = (transforms.DecodeImage(), transforms.Normalize(),
        transforms.Keep(["image", "label"]))
  el = clients.VirtualClientLoader(
      src, ts, sampling_rate=1.0, users_per_client=1,
      max_examples_per_user=2, clients_per_chunk=8, seed=3)(0)
  bad = el["bad_index"][0]
  assert sorted(bad[bad >= 0].tolist()) == [4, 5, 9]
  slot_all_bad, = [s for s in range(8) if sorted(bad[s].tolist()) == [4, 5]]
  ex = el["example"]
  assert el["mask"][0, slot_all_bad] == 1  # still a sampled user ...
  assert not ex["example_mask"][0, slot_all_bad].any()  # ... with no data.

  def loss_fn(shared, local, example):
    return (shared["w"] @ example["image"].reshape(-1) + local["b"]) ** 2

  local_train = user_level.local_training(
      loss_fn, lambda key: {"b": jnp.zeros(())},
      shared_optimizer=optax.sgd(0.1), local_optimizer=optax.sgd(0.1),
      batch_size=2)
  fn = jax.jit(user_level.clipped_delta_sum(local_train, 1.0))
  shared = {"w": jnp.asarray(rng.normal(size=48), jnp.float32)}
  units = {"example": {"image": ex["image"][0]},
           "mask": ex["example_mask"][0], "rng": ex["unit_rng"][0]}
  total, _ = fn(shared, units, el["mask"][0])
  without = el["mask"][0].copy()
  without[slot_all_bad] = 0.0
  total_without, _ = fn(shared, units, without)
  np.testing.assert_array_equal(total["w"], total_without["w"])
  assert np.abs(np.asarray(total["w"])).sum() > 0


class _Unreadable:
  """``records`` plus one last record that cannot be read (a missing
  file)."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records) + 1

  def __getitem__(self, index):
    if index == len(self.records):
      raise data_lib.BadRecord("missing_file", "gone.png does not exist")
    return self.records[index]
