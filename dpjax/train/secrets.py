"""The run's two secrets: the DP noise key and the sampling key.

DP-SGD's guarantee assumes that nobody can predict the Gaussian noise (else
it can be subtracted) or which examples each step sampled (else there is no
amplification by subsampling, and per-example augmentation or MAE masks
point at the examples used). So both keys are, by default, OS entropy filling
the whole raw PRNG key (64 bits for threefry: two uint32 words, not a 31-bit
integer seed), drawn on process 0 and broadcast so every process holds the
same key, and independent of `config.seed` (which drives initialisation and
public data only). They live in the TrainState (the noise key in the noise
transform's optimizer state, `train/state.py`), hence in the resumable
checkpoint, and nowhere else: never in logs, metrics, results.json or the
exported params.

An explicit seed (`config.privacy.noise_seed` / `sampling_seed` >= 0) gives
reproducible runs for tests and experiments; such a run's epsilon is not a
guarantee, and the loop says so (warning, `secret_randomness: false`).
"""

import jax
import numpy as np

from dpjax import privacy

# Folded into an explicit sampling seed so that noise_seed == sampling_seed
# still gives two different keys.
_SAMPLING_TAG = 0x5A3B1E
_PHASE_TAG = 0xF0A5E


def _broadcast(words: np.ndarray) -> np.ndarray:
  """Process 0's words on every process (a no-op on one process)."""
  if jax.process_count() == 1:
    return words
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32)


def run_key(seed: int, *, sampling: bool = False) -> np.ndarray:
  """The raw key (uint32[2] for threefry) of one of the run's secrets.

  Args:
    seed: < 0: fresh OS entropy (secret; the default). >= 0: the key of
      `jax.random.PRNGKey(seed)` (folded with a tag when `sampling`), for
      reproducible runs only.
    sampling: True for the sampling key, False for the noise key.

  Returns:
    The same uint32 words on every process.
  """
  if seed < 0:
    return _broadcast(privacy.noise.secret_key())
  key = jax.random.PRNGKey(seed)
  if sampling:
    key = jax.random.fold_in(key, _SAMPLING_TAG)
  return np.asarray(jax.random.key_data(key), np.uint32)


def phase_sampling_seed(sampling_key: np.ndarray, phase_index: int) -> int:
  """A 64-bit integer seed in [0, 2**64) for one phase's numpy pipelines.

  It is a hash of the whole sampling key and the phase index, so each
  private phase samples independently and the seed keeps the key's 64 bits.
  """
  words = [int(w) for w in np.asarray(sampling_key, np.uint32).reshape(-1)]
  seq = np.random.SeedSequence(words + [int(phase_index), _PHASE_TAG])
  return int(seq.generate_state(1, np.uint64)[0])


def host_words(key: jax.Array) -> np.ndarray:
  """A replicated key's words as host numpy (works across processes)."""
  return np.asarray(key.addressable_data(0), np.uint32)
