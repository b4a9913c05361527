"""A user-keyed parquet export (writer ids + labels) -> prepare -> DP-FedEmb.

The converter groups records by writer; DP-FedEmb's private source, its
virtual-client rounds and its held-out evaluation read the prepared
directory through ``arrayrecord:<dir>`` and the manifest's user ranges,
and the evaluation writers are disjoint from the training writers.
"""

import collections

import numpy as np
import pytest

from configs import dpfedemb as fedemb_config
from dpjax import recipes
from dpjax.data import clients
from dpjax.data import users as users_lib
from dpjax.prepare import run
from dpjax.prepare import stage
from dpjax.recipes import dpfedemb
from dpjax.recipes import dpfedemb_data
from tests.prepare import fake_inputs

_WRITERS = 20
_HELDOUT = 0.3


def _export(path) -> list[tuple[str, int]]:
  """One parquet file, writers interleaved (3-5 images each, distinct
  pictures); returns the (writer, label) of every row."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = [(f"f{w:04d}", (w + j) % 6) for w in range(_WRITERS)
          for j in range(3 + w % 3)]
  order = np.random.default_rng(0).permutation(len(rows))
  rows = [rows[i] for i in order]
  images = [fake_inputs.encode(fake_inputs.pixels(i, (16, 16)))
            for i in range(len(rows))]
  pq.write_table(pa.table({
      "png": [{"bytes": b, "path": None} for b in images],
      "writer_id": [w for w, _ in rows], "label": [l for _, l in rows],
      "key": [str(i) for i in range(len(rows))]}), path / "emnist.parquet")
  return rows


def _config(out: str, **overrides):
  """:tiny shrunk, DP phase only, on the prepared directory."""
  c = fedemb_config.get_config("tiny")
  spec = f"arrayrecord:{out}"
  c.phases = "dp"
  c.data.update(source=spec, eval_source=spec, split="train",
                eval_split="train", user_key="user", label_key="label",
                heldout_user_fraction=_HELDOUT, eval_label_range=(),
                eval_num_examples=200, eval_public=False)
  # k = 1 (a client per user, clipped to C); 8 virtual clients per chunk,
  # one per test device.
  c.fedemb.update(users_per_client=1, max_examples_per_user=5,
                  client_batch_size=8, local_classes=4, client_epochs=1,
                  unit_batch=0)
  c.train.update(steps=2, batch_size=8, microbatch_size=8, log_every=1,
                 checkpoint_every=10)
  c.privacy.noise_seed = 0
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fedemb")
  rows = _export(tmp)
  out = tmp / "out"
  m = run.prepare(str(tmp / "emnist.parquet"), "parquet", str(out),
                  stage.Options(caption_key="",
                                user_key="writer_id",
                                label_key="label"),
                  records_per_shard=16)
  return str(out), m, rows


def test_eval_writers_are_disjoint_from_training_writers(prepared):
  out, m, rows = prepared
  assert m["num_examples"] == len(rows) and m["users"]["num_users"] == 20
  config = _config(out)
  train = dpfedemb_data.private_source(config)
  train_users = {train.user_id(u) for u in range(train.num_users)}
  evals = dpfedemb_data.eval_source(config)
  idx = dpfedemb_data.eval_indices(config, evals)
  eval_users = {evals[i]["user"] for i in idx}
  held = {w for w, _ in rows if users_lib.is_heldout_user(w, _HELDOUT)}
  assert train_users and eval_users == held
  assert not train_users & eval_users
  assert train_users | eval_users == {w for w, _ in rows}
  # Every record of a held-out writer is evaluated, nothing else.
  assert len(idx) == sum(w in held for w, _ in rows)
  # Each training user's indices are exactly its records.
  per_writer = collections.Counter(w for w, _ in rows)
  for u in range(train.num_users):
    recs = [evals[i] for i in train.user_indices(u)]
    assert {r["user"] for r in recs} == {train.user_id(u)}
    assert len(recs) == per_writer[train.user_id(u)]


def test_rounds_load_whole_sampled_writers(prepared):
  out, _, rows = prepared
  config = _config(out)
  task = dpfedemb.build(config)
  (phase,) = task.phases
  src = phase.source
  it = phase.make_batches(source=src,
                          sampling_rate=phase.batch_size / phase.num_examples,
                          seed=3, start_step=0, num_steps=1,
                          global_microbatch=8, process_index=0,
                          process_count=1, num_workers=0)
  el = next(it)
  f = config.fedemb
  rc = clients.round_clients(
      users_lib.user_keys(src), 3, 0, phase.batch_size / src.num_users,
      f.users_per_client,
      clients.num_virtual_clients(config.train.batch_size,
                                      f.users_per_client),
      clients.client_capacity(f.client_capacity, f.users_per_client))
  assert rc.num_users > 0
  labels = {w: sorted(l for x, l in rows if x == w) for w, _ in rows}
  ex = el["example"]
  rows_per_client = ex["example_mask"].shape[-1]
  mask = ex["example_mask"].reshape(-1, rows_per_client) > 0
  got_labels = ex["label"].reshape(-1, rows_per_client)
  slot_ids = el["user"].reshape(-1)  # Virtual-client id per slot; -1 pad.
  assert sorted(slot_ids[slot_ids >= 0]) == sorted(rc.ids.tolist())
  for s, cid in enumerate(slot_ids):
    members = (rc.members[rc.ids.tolist().index(cid)] if cid >= 0 else [])
    want = sorted(l for u in members for l in labels[src.user_id(u)])
    got = sorted(got_labels[s][mask[s]].tolist())
    assert got == want  # All of each sampled writer's records (E = 5).


def test_two_dp_rounds_train_and_evaluate_held_out_writers(prepared,
                                                           tmp_path):
  out, _, rows = prepared
  results = recipes.run(_config(out), str(tmp_path / "run"))
  held = {w for w, _ in rows if users_lib.is_heldout_user(w, _HELDOUT)}
  assert results["dp/num_examples"] == _WRITERS - len(held)  # users.
  assert results["step"] == 2
  assert 0.0 <= results["private_eval/retrieval/recall_at_1"] <= 1.0
