"""No repr/str of an object that holds a secret seed or key shows it.

Each object is built with a recognisable secret; neither its decimal nor
its hexadecimal form may appear in repr() or str() (a log line, a Grain
error note or a debugger dump would otherwise publish it).
"""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import privacy
from dpjax.data import clients
from dpjax.data import pipeline
from dpjax.data import users as users_lib
from dpjax.privacy import bandmf
from dpjax.privacy import blt
from dpjax.train import step as step_lib

SEED = 0xDEADBEEF12345  # A phase's secret sampling seed.
WORDS = (0xDEADBEEF, 0xCAFEF00D)  # A secret raw key's uint32 words.
KEY = np.asarray(WORDS, np.uint32)


def _forms(value: int) -> list[str]:
  return [str(value), f"{value:x}", f"{value:X}"]


def _assert_hidden(obj, secrets=(SEED,) + WORDS) -> str:
  for text in (repr(obj), str(obj)):
    for s in secrets:
      for form in _forms(s):
        assert form not in text, (form, text)
  return repr(obj)


def _records(n=6):
  return [{"x": np.float32(i), "user": 100 + i // 2} for i in range(n)]


def test_step_and_row_loaders_and_grain_datasets_on_them():
  loader = pipeline.StepLoader(_records(), (), 0.5, 4, SEED)
  assert loader.seed == SEED  # Still there, only not printed.
  text = _assert_hidden(loader)
  assert "sampling_rate=0.5" in text  # The public fields still are.
  _assert_hidden(pipeline.RowLoader(_records(), (), SEED))
  # The pipeline's own graph (StepIterator._start), and the iterators.
  ds = grain.MapDataset.range(0, 3).map(loader)
  _assert_hidden(ds)
  _assert_hidden(ds.to_iter_dataset())
  it = pipeline.poisson_batches(_records(), sampling_rate=0.5,
                                global_microbatch=4, seed=SEED, num_steps=2)
  _assert_hidden(it)
  next(it)
  _assert_hidden(it)
  _assert_hidden(pipeline.PoissonBatches(
      _records(), sampling_rate=0.5, global_microbatch=4, seed=SEED,
      num_steps=2))


def test_virtual_client_loader():
  src = users_lib.UserKeyedSource(_records(), "user")
  loader = clients.VirtualClientLoader(
      src, (), sampling_rate=1.0, users_per_client=1,
      max_examples_per_user=2, clients_per_chunk=4, seed=SEED)
  _assert_hidden(loader)
  _assert_hidden(grain.MapDataset.range(0, 2).map(loader))


@pytest.mark.parametrize("make", [
    lambda: privacy.add_noise(1.0, 1.0, 10.0, seed=jnp.asarray(KEY)),
    lambda: bandmf.bandmf_noise(1.0, 1.0, 10.0, 2, seed=jnp.asarray(KEY)),
    lambda: blt.blt_noise(1.0, 1.0, 10.0, blt.Strategy((0.5,), (0.1,)), 4,
                          seed=jnp.asarray(KEY)),
], ids=["add_noise", "bandmf", "blt"])
def test_noise_states_hide_their_key(make):
  params = {"w": jnp.zeros((2,))}
  state = make().init(params)
  assert np.array_equal(np.asarray(state.rng_key), KEY)
  assert "rng_key=<secret>" in _assert_hidden(state)


def test_train_state_hides_both_keys():
  params = {"w": jnp.zeros((2,))}
  opt = optax.chain(privacy.add_noise(1.0, 1.0, 10.0, seed=jnp.asarray(KEY)),
                    optax.sgd(0.1))
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=opt.init(params),
      sampling_key=jnp.asarray(np.asarray(WORDS[::-1], np.uint32)))
  text = _assert_hidden(state)
  assert "sampling_key=<secret>" in text and "rng_key=<secret>" in text
  # A pytree like before: jax sees the same leaves.
  assert len(jax.tree.leaves(state)) == 5
