"""Tests for dpjax.data.pipeline."""

import json
import os

import grain
import jax
from etils import epath
import numpy as np
import pytest
from jax.sharding import Mesh

from dpjax.data import pipeline
from dpjax.data import synthetic
from dpjax.data import transforms
from dpjax.privacy import sampling
from dpjax.train import mesh as mesh_lib


class IndexSource:
  """Fake source of any size: record i is {"x": i, "v": [i, -i]}."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"x": np.int64(i), "v": np.array([i, -i], np.int64)}


def _batches(n=1000, q=0.05, micro=16, seed=7, steps=4, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return pipeline.poisson_batches(IndexSource(n), sampling_rate=q,
                                  global_microbatch=micro, seed=seed,
                                  num_steps=steps, **kw)


def test_rows_are_the_poisson_sample_with_correct_masks():
  for b in _batches(steps=5):
    step = int(b["step"])
    expected = sampling.sample_indices(7, step, 1000, 0.05)
    n_micro = max(1, -(-expected.size // 16))
    x = b["example"]["x"]
    assert x.shape == (n_micro, 16) and b["mask"].shape == (n_micro, 16)
    assert b["example"]["v"].shape == (n_micro, 16, 2)
    assert b["batch_size"] == expected.size
    real = b["mask"].reshape(-1) == 1
    np.testing.assert_array_equal(b["example"]["x"].reshape(-1)[real],
                                  expected)
    assert real[:expected.size].all() and not real[expected.size:].any()
    assert set(np.unique(b["mask"])) <= {0.0, 1.0}


def test_cyclic_sampling_draws_only_the_steps_partition_at_rate_qb():
  """sampler Cyclic(b): step t samples the indices of partition t mod b (each
  index's own secret partition), each at rate q*b (the sampling
  privacy.bandmf's accounting assumes); expected batch q*N."""
  n, q, b, steps = 1000, 0.02, 4, 400
  loader = pipeline.StepLoader(IndexSource(n), (), q, 16, seed=3,
                               sampler=sampling.Cyclic(b))
  counts, sizes = np.zeros(n), []
  for t in range(steps):
    idx = loader.indices(t)
    assert (sampling.partition_of(3, idx, b) == t % b).all()
    assert (np.diff(idx) > 0).all()
    counts[idx] += 1
    sizes.append(idx.size)
  # Each example is eligible on steps / b steps, sampled at q*b there.
  rate = counts / (steps / b)
  assert abs(rate.mean() - q * b) < 0.005
  assert abs(np.mean(sizes) - q * n) < 1.5
  # The batches themselves come from it (rows = the loader's indices).
  loader = pipeline.StepLoader(IndexSource(n), (), q, 16, seed=7,
                               sampler=sampling.Cyclic(b))
  for batch in _batches(n=n, q=q, steps=3, sampler=sampling.Cyclic(b)):
    x = batch["example"]["x"].reshape(-1)[batch["mask"].reshape(-1) == 1]
    np.testing.assert_array_equal(x, loader.indices(int(batch["step"])))


def test_two_processes_partition_the_batch():
  b0 = list(_batches(process_index=0, process_count=2))
  b1 = list(_batches(process_index=1, process_count=2))
  for a, b in zip(b0, b1):
    assert a["example"]["x"].shape[1] == 8
    assert a["batch_size"] == b["batch_size"]
    both = np.concatenate([a["example"]["x"], b["example"]["x"]], axis=1)
    mask = np.concatenate([a["mask"], b["mask"]], axis=1)
    expected = sampling.sample_indices(7, int(a["step"]), 1000, 0.05)
    np.testing.assert_array_equal(both.reshape(-1)[mask.reshape(-1) == 1],
                                  expected)


def test_resume_from_state_gives_identical_next_batch(tmp_path):
  full = list(_batches(steps=6))
  it = _batches(steps=6)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["next_step"] == 3
  resumed = _batches(steps=6)
  resumed.set_state(state)
  direct = _batches(steps=6, start_step=3)
  for ref, got, got2 in zip(full[3:], resumed, direct):
    for k in ref["example"]:
      np.testing.assert_array_equal(ref["example"][k], got["example"][k])
      np.testing.assert_array_equal(ref["example"][k], got2["example"][k])
    np.testing.assert_array_equal(ref["mask"], got["mask"])
  with pytest.raises(StopIteration):
    next(resumed)
  # Works with grain's Orbax checkpoint handler too.
  ckpt = epath.Path(tmp_path)
  grain.checkpoint.CheckpointHandler().save(ckpt, item=it)
  restored = grain.checkpoint.CheckpointHandler().restore(
      ckpt, item=_batches(steps=6))
  np.testing.assert_array_equal(next(restored)["example"]["x"],
                                full[3]["example"]["x"])
  with pytest.raises(ValueError, match="seed"):
    _batches(seed=8).set_state(state)


def test_two_billion_examples():
  it = _batches(n=2_000_000_000, q=40 / 2e9, micro=32, steps=2)
  for b in it:
    expected = sampling.sample_indices(7, int(b["step"]), 2_000_000_000,
                                       40 / 2e9)
    real = b["mask"].reshape(-1) == 1
    np.testing.assert_array_equal(b["example"]["x"].reshape(-1)[real],
                                  expected)
    assert b["example"]["x"].size <= 32 * 4


def test_rng_leaf():
  b = next(iter(_batches()))
  keys, mask = b["example"]["rng"], b["mask"]
  assert keys.dtype == np.uint32 and keys.shape == mask.shape + (2,)
  real = keys[mask == 1]
  assert len({tuple(k) for k in real}) == len(real)
  assert np.all(keys[mask == 0] == 0)
  again = next(iter(_batches()))
  np.testing.assert_array_equal(again["example"]["rng"], keys)
  other = next(iter(_batches(seed=8)))
  assert not np.array_equal(other["example"]["rng"][0, 0], keys[0, 0])


class AddPid(grain.transforms.Map):

  def map(self, record):
    return {**record, "pid": np.int64(os.getpid())}


def _shapes_ts():
  return [transforms.RandomResizedCrop(16), transforms.RandomFlip(),
          transforms.Normalize(), AddPid(),
          transforms.Keep(["image", "label", "pid"])]


def test_worker_processes_match_in_process():
  src = synthetic.ShapesCaptions(2000, seed=1)
  kw = dict(sampling_rate=0.01, global_microbatch=16, seed=3, num_steps=4,
            transforms=_shapes_ts(), process_index=0, process_count=1)
  local = list(pipeline.poisson_batches(src, **kw))
  it = pipeline.poisson_batches(src, num_workers=2, **kw)
  remote = list(it)
  it.close()
  assert len(local) == len(remote) == 4
  for a, b in zip(local, remote):
    assert a.keys() == b.keys()
    assert np.all(a["example"]["pid"] == os.getpid())
    # Loaded in grain worker processes.
    assert not np.any(b["example"]["pid"] == os.getpid())
    np.testing.assert_array_equal(a["mask"], b["mask"])
    for k in ("image", "label", "rng"):
      np.testing.assert_array_equal(a["example"][k], b["example"][k])


def test_to_global_array_on_8_devices():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  b = next(iter(_batches(micro=16)))
  g = mesh_lib.to_global_array(b, mesh, jax.sharding.PartitionSpec(None,
                                                                  "data"))
  g["x"] = g["example"]["x"]
  g["v"] = g["example"]["v"]
  assert g["x"].shape == b["example"]["x"].shape
  assert g["x"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
  assert len(g["x"].addressable_shards) == 8
  n_micro = b["example"]["x"].shape[0]
  assert g["x"].addressable_shards[0].data.shape == (n_micro, 2)
  np.testing.assert_array_equal(np.asarray(g["v"]), b["example"]["v"])
  assert g["step"] == 0 and isinstance(g["batch_size"], int)
  # As the training loop uses it: one microbatch at a time, P("data").
  micro = jax.tree.map(lambda x: x[0], b["example"])
  gm = mesh_lib.to_global_array(micro, mesh)
  assert gm["v"].shape == (16, 2) and len(gm["v"].addressable_shards) == 8
  gmask = mesh_lib.to_global_array(b["mask"][0], mesh)
  np.testing.assert_array_equal(np.asarray(gmask), b["mask"][0])
  # PoissonBatches (iterable form) gives the same elements.
  pb = pipeline.PoissonBatches(IndexSource(1000), (), sampling_rate=0.05,
                               global_microbatch=16, seed=7, num_steps=1,
                               process_index=0, process_count=1)
  np.testing.assert_array_equal(next(iter(pb))["example"]["x"],
                                b["example"]["x"])


def test_a_sampler_with_fixed_rows_gives_every_step_the_same_shape():
  """Truncated Poisson (`privacy.mechanisms.truncated_poisson`): every step
  reads `rows` rows whatever the draw (padding masked), so a step's time
  does not reveal its realised batch size; the real rows are the draw."""
  from dpjax.privacy.mechanisms import truncated_poisson  # pylint: disable=g-import-not-at-top
  n, q, rows = 400, 0.05, 32
  sampler = truncated_poisson.TruncatedPoisson(rows)
  loader = pipeline.StepLoader(IndexSource(n), (), q, 16, seed=5,
                               sampler=sampler)
  shapes, sizes = set(), set()
  for t in range(12):
    batch = loader(t)
    shapes.add(batch["mask"].shape)
    sizes.add(int(batch["mask"].sum()))
    x = batch["example"]["x"].reshape(-1)[batch["mask"].reshape(-1) == 1]
    np.testing.assert_array_equal(np.sort(x), loader.indices(t))
    assert loader.indices(t).size <= rows
  assert shapes == {(rows // 16, 16)} and len(sizes) > 1
