"""The shared suite: every registered mechanism (`privacy.mechanisms.NAMES`)
through the same checks. A new mechanism joins it by its registry line
(its test knobs below only if its defaults are not a real instance).

- sampler adjacency: over secret seeds every position joins a step with the
  same probability (q for an untruncated sampler), odd and even alike;
- noise: the transform's noise over a phase has the covariance the
  mechanism states (`noise_covariance`), at scale sigma C / expected batch;
- accounting: the ledger of a whole phase, step by step or in chunks, gives
  the mechanism's own epsilon; calibration meets the target, tightly;
- resume: the transform's state through a host copy (as a checkpoint
  holds it) continues bit for bit; the signature survives JSON, and a
  correlated mechanism refuses another sigma;
- sharding: on 8 devices its state is sharded like the params and its
  output equals one device's.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpjax import errors
from dpjax import privacy
from dpjax.privacy import mechanisms
from tests.privacy import adjacency_test

# Knobs that make each mechanism a real instance of itself (not DP-SGD).
KNOBS = {"bandmf": dict(bands=2), "blt": dict(min_separation=2,
                                              blt_buffers=2),
         "truncated_poisson": dict(max_batch_size=3)}
NAMES = mechanisms.NAMES


def _mechanism(name: str, sigma: float = 1.0, *, n: int = 40, batch: int = 2,
               steps: int = 6) -> mechanisms.Mechanism:
  out = mechanisms.resolve(dict(mechanism=name, **KNOBS.get(name, {})),
                           noise_multiplier=sigma, num_examples=n,
                           batch_size=batch, steps=steps, delta=1e-5,
                           accountant="pld")
  assert out.name == name
  return out


@pytest.mark.parametrize("name", NAMES)
def test_registry_and_config_block_agree(name):
  from configs import common  # pylint: disable=g-import-not-at-top
  block = common.privacy_block()
  for knob, default in mechanisms.REGISTRY[name].knobs.items():
    assert block[knob] == default, knob
  assert mechanisms.get(name).name == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("step", [0, 1])
def test_sampler_every_position_joins_alike(name, step):
  m = _mechanism(name, n=48, batch=2)  # q = 1/24; truncation at 3 rows.
  sampler = m.sampler()
  x = adjacency_test._inclusion(  # pylint: disable=protected-access
      sampler, step, m.num_examples, m.sampling_rate)
  rate = x.mean() if sampler.rows else m.sampling_rate
  adjacency_test._assert_every_position_joins_with_probability(  # pylint: disable=protected-access
      x, rate, range(m.num_examples))
  if sampler.rows:  # Never more rows than it pads to.
    assert x.sum(1).max() <= sampler.rows
  for seed in adjacency_test._SEEDS[:20]:  # pylint: disable=protected-access
    a = sampler(seed, step, m.num_examples, m.sampling_rate)
    np.testing.assert_array_equal(
        a, sampler(seed, step, m.num_examples, m.sampling_rate))
    assert (np.diff(a) > 0).all()


def _run(tx, params, steps, state=None, inputs=None):
  state = tx.init(params) if state is None else state
  outs = []
  for t in range(steps):
    g = params if inputs is None else inputs[t]
    out, state = tx.update(g, state)
    outs.append(out)
  return outs, state


@pytest.mark.parametrize("name", NAMES)
def test_noise_has_the_stated_covariance(name):
  sigma, clip, batch, dim = 2.0, 0.5, 4.0, 40_000
  m = _mechanism(name, sigma)
  tx = m.noise(clip, batch, seed=3)
  outs, _ = jax.jit(lambda p: _run(tx, p, m.steps))({"w": jnp.zeros(dim)})
  y = np.stack([np.asarray(o["w"], np.float64) for o in outs])
  y *= batch / (sigma * clip)
  want = m.noise_covariance()
  np.testing.assert_allclose(y @ y.T / dim, want,
                             atol=6 * np.abs(want).max() / np.sqrt(dim))


@pytest.mark.parametrize("name", NAMES)
def test_ledger_of_the_phase_is_its_epsilon(name):
  m = _mechanism(name, 3.0)  # A small PLD support: cheap.
  by_step = privacy.PrivacyLedger(m.num_examples, m.delta)
  for t in range(m.steps):
    m.record(by_step, t, 1)
  chunks = privacy.PrivacyLedger(m.num_examples, m.delta)
  m.record(chunks, 0, 1)
  m.record(chunks, 1, m.steps - 1)
  assert by_step.epsilon() == pytest.approx(m.epsilon(), rel=1e-6)
  assert chunks.epsilon() == pytest.approx(m.epsilon(), rel=1e-6)
  assert np.isinf(_mechanism(name, 0.0).epsilon())


@pytest.mark.parametrize("name", NAMES)
def test_calibration_meets_the_target(name):
  target = 1.0  # A large sigma: a small PLD support, cheap.
  m = _mechanism(name).calibrated(target)
  assert m.epsilon() <= target
  smaller = dataclasses.replace(m, noise_multiplier=0.99 *
                                m.noise_multiplier)
  assert smaller.epsilon() > target  # Tight: 1% less sigma exceeds it.


@pytest.mark.parametrize("name", NAMES)
def test_state_resumes_bit_for_bit(name):
  m = _mechanism(name)
  tx = m.noise(1.0, 2.0, seed=jax.random.PRNGKey(7), initial_count=5)
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
  rng = np.random.default_rng(0)
  inputs = [jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), jnp.float32), params) for _ in range(5)]
  want, _ = _run(tx, params, 5, inputs=inputs)
  first, state = _run(tx, params, 2, inputs=inputs)
  saved = jax.device_get(state)  # What a checkpoint holds (host numpy).
  restored = jax.tree.map(jnp.asarray, saved)
  rest, _ = _run(tx, params, 3, restored, inputs[2:])
  for got, exp in zip(first + rest, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(exp)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_resume_signature(name):
  m = _mechanism(name)
  saved = json.loads(json.dumps(m.signature()))
  m.check_resumable(saved, 3, "dp")  # The same values continue.
  other = _mechanism(name, sigma=2.0)
  if m.correlated:
    with pytest.raises(errors.ConfigError,
                       match="config.privacy.noise_multiplier=2.0"):
      other.check_resumable(saved, 3, "dp")
  else:  # The ledger records each step's own sigma.
    other.check_resumable(saved, 3, "dp")
  with pytest.raises(errors.ConfigError, match="config.privacy.mechanism"):
    mechanisms.base.check_signature(saved, {}, 3, "dp")


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("name", NAMES)
def test_state_is_sharded_like_the_params_on_8_devices(name):
  tx = _mechanism(name).noise(1.0, 2.0, seed=5)
  z = {"w": jnp.zeros((64, 48))}
  shard = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)),
                        P("data"))
  run = jax.jit(lambda p: _run(tx, p, 3))
  want, _ = run(z)
  outs, state = run({"w": jax.device_put(z["w"], shard)})
  for leaf in jax.tree.leaves(state):
    if leaf.shape == z["w"].shape:  # Buffers like the params.
      assert leaf.sharding.is_equivalent_to(shard, 2)
  for got, exp in zip(outs, want):
    assert got["w"].sharding.is_equivalent_to(shard, 2)
    np.testing.assert_allclose(got["w"], exp["w"], rtol=1e-6, atol=1e-6)
