"""The run's secrets: noise and sampling keys are OS entropy over the whole
key, independent of config.seed, kept in the checkpoint, out of export/, and
nothing derived from the realised batch leaves "private/"."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import dpcap as dpcap_config
from dpjax import recipes
from dpjax.data import pipeline
from dpjax.privacy import noise
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import metrics
from dpjax.train import secrets


def test_default_keys_fill_the_whole_key_and_differ_per_run():
  keys = np.stack([secrets.run_key(-1) for _ in range(64)])
  assert keys.dtype == np.uint32 and keys.shape == (64, noise.secret_key().size)
  assert len({tuple(k) for k in keys}) == 64
  # The old int seed (os.urandom(4) >> 1, then PRNGKey) left word 0 at 0
  # and word 1 below 2**31: 31 bits. Both words' high bits now vary.
  for word in range(keys.shape[1]):
    assert 10 < int(np.sum(keys[:, word] >= 2**31)) < 54


def test_explicit_seeds_are_reproducible_and_noise_differs_from_sampling():
  np.testing.assert_array_equal(secrets.run_key(3), secrets.run_key(3))
  np.testing.assert_array_equal(secrets.run_key(3),
                                jax.random.PRNGKey(3))  # Seeded runs as before.
  assert not np.array_equal(secrets.run_key(3),
                            secrets.run_key(3, sampling=True))


def test_phase_seed_keeps_64_bits_and_separates_phases():
  key = noise.secret_key()
  seeds = {secrets.phase_sampling_seed(key, i) for i in range(4)}
  assert len(seeds) == 4 and all(0 <= s < 2**64 for s in seeds)
  highs = [secrets.phase_sampling_seed(noise.secret_key(), 0) >= 2**63
           for _ in range(64)]
  assert 10 < sum(highs) < 54
  # The numpy pipelines accept the full range.
  idx = pipeline.sampling.sample_indices(2**64 - 1, 5, 1000, 0.1)
  assert idx.size > 0


def _config(**privacy):
  c = dpcap_config.get_config("tiny")
  c.model.update(stem="patch", encoder_depth=1, decoder_depth=1)
  c.train.update(steps=2, batch_size=48, microbatch_size=32, log_every=1,
                 warmup_steps=1, checkpoint_every=100)
  c.data.update(num_examples=500, eval_num_examples=8)
  c.evals = ml_collections.ConfigDict()  # no evaluation.
  c.privacy.noise_multiplier = 1.0
  c.privacy.update(privacy)
  return c


def noise_key(state) -> np.ndarray:
  """The DP noise's root key in a restored state: the noise transform's
  `AddNoiseState.rng_key`, first in the step optimizer's state."""
  return np.asarray(state["opt_state"]["noise"]["rng_key"])


def _final(workdir):
  ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  state, _ = ckpt.restore_numpy()
  ckpt.close()
  return state


def _run(tmp_path, name, **privacy):
  workdir = str(tmp_path / name)
  results = recipes.run(_config(**privacy), workdir)
  return workdir, results, _final(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("secrets")
  # A realised batch size the logs must never reflect.
  call = pipeline.StepLoader.__call__

  def loud(self, step):
    out = call(self, step)
    out["batch_size"] = np.int64(10**9)
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline.StepLoader, "__call__", loud)
    noise_only = [_run(tmp, f"noise{i}", noise_seed=0) for i in range(2)]
  both = [_run(tmp, f"both{i}", noise_seed=0, sampling_seed=0)
          for i in range(2)]
  return noise_only, both


def test_fixed_noise_seed_still_samples_secretly(runs):
  (w0, r0, s0), (_, _, s1) = runs[0]
  assert r0["secret_sampling"] and not r0["secret_noise"]
  assert not r0["secret_randomness"]
  np.testing.assert_array_equal(noise_key(s0), noise_key(s1))
  # Same config, different batches: the sampling key is not in the config.
  assert not np.array_equal(s0["sampling_key"], s1["sampling_key"])
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(s0["params"]), jax.tree.leaves(s1["params"])))
  with open(os.path.join(w0, "results.json")) as f:
    saved = json.load(f)
  assert saved["secret_randomness"] is False
  # No secret in results.json.
  text = json.dumps(saved)
  for word in np.asarray(s0["sampling_key"]).reshape(-1):
    assert str(int(word)) not in text


def test_both_seeds_reproduce_bitwise_and_say_not_secret(runs):
  (_, r0, s0), (_, _, s1) = runs[1]
  assert r0["secret_randomness"] is False
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_array_equal(a, b)


def test_nothing_derived_from_the_realised_batch_is_logged(runs):
  (w0, r0, _), _ = runs[0]
  logged = metrics.read_csv(w0)
  public = {k for k in logged if not k.startswith(("private/", "eval/"))}
  assert public == {"examples_per_sec", "epsilon"}, public
  # Throughput comes from the expected batch q*N, not the realised size
  # (the patched loader claimed 1e9 examples per step).
  assert max(v for _, v in logged["examples_per_sec"]) < 1e8


def test_export_holds_params_only(runs):
  (w0, _, state), _ = runs[0]
  path = ckpt_lib.export_dir(w0)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype,
          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      state["params"])
  params = ckpt_lib.load_exported(path, abstract)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  # No key anywhere in the export directory.
  blob = b""
  for root, _, files in os.walk(os.path.dirname(path)):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        blob += f.read()
  for key in ("rng_key", "sampling_key", "opt_state"):
    assert key.encode() not in blob
