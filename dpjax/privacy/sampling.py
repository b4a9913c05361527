"""Poisson subsampling of example indices for DP-SGD.

DP-SGD's accounting (``accounting.dp_event(..., sampling="poisson")``) assumes
that each example joins each step's batch independently with probability
``q``. We draw that batch cheaply and exactly: the batch size ``k`` is drawn
from ``Binomial(N, q)``, then a uniformly random ``k``-subset of ``[0, N)``.
Both draws cost O(k) time and memory, never O(N), so datasets of billions of
examples are fine.

Batches vary in size; ``poisson_sample`` pads them to a fixed physical shape
with a ``[max_batch_size]`` mask so that ``jax.jit`` never recompiles. Padded
rows must contribute exactly zero (``clipping.clipped_grad`` guarantees this).
If a Poisson draw exceeds ``max_batch_size`` it is *truncated* to a uniformly
random subset of ``max_batch_size`` examples: this is a different mechanism,
accounted by dp_accounting's ``TruncatedSubsampledGaussianDpEvent``
(``accounting.dp_event(..., sampling="truncated_poisson", num_examples=N,
max_batch_size=B)``). Choose ``max_batch_size = max_batch_size_for(N, q)`` to
make truncation negligible, or account for it.

Randomness is a pure function of ``(seed, step)``: a resumed run resamples the
same batches, and each step's batch is independent of every other step's.
The seed must be SECRET (``secret_seed()``: 64 bits of OS entropy; keep it
with your checkpoint, never log it): amplification by subsampling assumes
nobody knows which examples a step used, and a seed in a config voids it.
"""

import math
import os
from typing import NamedTuple

import numpy as np

# Distinct stream tags so the batch draw and the truncation draw never share
# random bits with each other or with other users of (seed, step).
_SAMPLE_TAG = 0x5A4D9E1
_TRUNCATE_TAG = 0x7C0FFEE
_PARTITION_TAG = 0xC7C11C  # b-cyclic partitions: no step, fixed per phase.


class PoissonBatch(NamedTuple):
  """A Poisson-sampled batch padded to a fixed shape.

  Attributes:
    indices: int64[max_batch_size]; example indices, sorted, padded with 0.
    mask: float32[max_batch_size]; 1.0 for real rows, 0.0 for padding.
    size: number of real rows (``mask.sum()``).
    truncated: True if the Poisson draw exceeded ``max_batch_size`` and was
      subsampled down to it (account with ``sampling="truncated_poisson"``).
  """
  indices: np.ndarray
  mask: np.ndarray
  size: int
  truncated: bool


def secret_seed() -> int:
  """A secret sampling seed: 64 bits of OS entropy, as an int in [0, 2**64).

  Formal role: with this seed kept secret, the batches of ``sample_indices``
  / ``poisson_sample`` are unpredictable to everyone else, as Poisson
  amplification by subsampling requires. Store it with the (private)
  training state to resume; never log or publish it.

  >>> 0 <= secret_seed() < 2**64
  True
  """
  return int.from_bytes(os.urandom(8), "little")


def _rng(seed: int, step: int, tag: int) -> np.random.Generator:
  if seed < 0 or step < 0:
    raise ValueError(f"seed and step must be >= 0, got {seed=}, {step=}.")
  return np.random.default_rng([int(seed), int(step), tag])


def _uniform_subset(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  """Uniformly random k-subset of [0, n), sorted int64, O(k) expected cost."""
  if k == 0:
    return np.zeros((0,), np.int64)
  if 4 * k >= n:  # Dense: n <= 4k, so a permutation is still O(k).
    return np.sort(rng.permutation(n)[:k]).astype(np.int64)
  # Sparse: draw with replacement and redraw duplicates. The procedure commutes
  # with every permutation of [0, n), and the symmetric group is transitive on
  # k-subsets, so the result is uniform. With k <= n/4, each round keeps at
  # least ~3/4 of the missing draws in expectation.
  chosen = np.unique(rng.integers(0, n, size=k, dtype=np.int64))
  while chosen.size < k:
    extra = rng.integers(0, n, size=k - chosen.size, dtype=np.int64)
    chosen = np.unique(np.concatenate([chosen, extra]))
  return chosen


def _check_args(num_examples: int, sampling_rate: float) -> None:
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
  if not 0.0 <= sampling_rate <= 1.0:
    raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}.")


def sample_indices(seed: int, step: int, num_examples: int,
                   sampling_rate: float) -> np.ndarray:
  """Poisson-subsamples ``[0, num_examples)`` for one step.

  Formal guarantees: every index is included independently with probability
  ``sampling_rate`` (size ~ Binomial(N, q), then a uniform subset of that
  size, which is the same distribution). This is the sampling that
  ``PoissonSampledDpEvent`` accounting assumes. Output is a deterministic
  function of ``(seed, step)``; different steps use independent streams.
  Cost is O(batch size) time and memory, independent of ``num_examples``.

  >>> idx = sample_indices(seed=0, step=3, num_examples=2_000_000_000,
  ...                      sampling_rate=5e-8)
  >>> idx.dtype, bool(np.all(np.diff(idx) > 0))
  (dtype('int64'), True)
  >>> np.array_equal(idx, sample_indices(0, 3, 2_000_000_000, 5e-8))
  True

  Args:
    seed: non-negative int; the sampling seed of the run.
    step: non-negative int; the logical training step.
    num_examples: dataset size N.
    sampling_rate: inclusion probability q in [0, 1].

  Returns:
    int64[k], sorted distinct indices in ``[0, N)``, k ~ Binomial(N, q).
  """
  _check_args(num_examples, sampling_rate)
  rng = _rng(seed, step, _SAMPLE_TAG)
  k = int(rng.binomial(num_examples, sampling_rate)) if num_examples else 0
  return _uniform_subset(rng, num_examples, k)


def mix(*keys) -> np.ndarray:
  """SplitMix64-style hash of uint64 arrays (broadcast) -> uint64.

  The finaliser of SplitMix64 chained over the inputs: with one input a
  secret 64-bit seed, the outputs at distinct other inputs behave as
  independent uniform 64-bit draws (the keyed hash the per-record draws of
  ``dpjax.data`` and ``partition_of`` use).
  """
  h = np.uint64(0x9E3779B97F4A7C15)
  for k in keys:
    h = finalize64(h ^ np.asarray(k).astype(np.uint64))
  return h


def finalize64(z: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser, a bijection of uint64 (array or scalar)."""
  with np.errstate(over="ignore"):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def partition_of(seed: int, indices: np.ndarray, cycle: int) -> np.ndarray:
  """int64[n]: the b-cyclic partition of each index, in [0, cycle).

  A keyed hash of (tag, secret seed, index) mod b: with the seed secret,
  each index's partition is its own i.i.d. draw, uniform over [0, b) (up to
  a bias < b / 2**64), independent of the data and of the step, so fixed
  for the whole phase.
  """
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed=}.")
  h = mix(np.uint64(_PARTITION_TAG), np.uint64(seed),
          np.asarray(indices, np.int64).astype(np.uint64))
  return (h % np.uint64(cycle)).astype(np.int64)


def sample_cyclic_indices(seed: int, step: int, num_examples: int,
                          sampling_rate: float, cycle: int) -> np.ndarray:
  """Exchangeable b-cyclic Poisson sampling: step t samples partition t mod b.

  Each index i has its own secret partition p_i = ``partition_of(seed, i,
  b)``, i.i.d. uniform over [0, b) and fixed for the phase. Step t draws
  candidates Poisson at rate min(1, q b) over all of [0, N)
  (``sample_indices``, the step's own stream) and keeps those with
  p_i = t mod b. So, given the partitions, each member of partition
  t mod b joins step t independently with probability q b, and an example
  can take part only every b-th step; over the partition draw every index
  joins every step with probability q. cycle = 1 is ``sample_indices``
  exactly. Cost O(q b N) = O(b * batch) expected, never O(N).

  Formal guarantee (add/remove-one, example level): the run is as private
  as b-cyclic Poisson sampling with a FIXED partition (what BandMF's and
  BLT's accounting assume: ``privacy.bandmf``, ``privacy.blt``):

  - The partition is independent of the data and of the other records.
  - Fix the other records' partitions: D and its neighbour D' differ in
    one record, whose partition is uniform and independent. The output
    distribution is then a mixture, over that record's partition, of
    fixed-partition b-cyclic mechanisms, each meeting the bound; by joint
    convexity of the hockey-stick divergence the mixture meets it too (this
    holds for any law of that partition, so the 2**-64 bias is harmless).
  - The other records' partitions have the same joint law in D and D'
    (i.i.d. over indices), and so do their Poisson draws: the shift of
    index of every record after a removed one changes nothing in
    distribution. (With p_i = i mod b, it changed every later record's
    partition: a distinguisher at the first step; hence the hash.)

  The seed must be secret (``secret_seed()``), as for ``sample_indices``.

  >>> idx = sample_cyclic_indices(0, step=5, num_examples=1000,
  ...                             sampling_rate=0.05, cycle=4)
  >>> set(partition_of(0, idx, 4).tolist())  # Partition 5 mod 4.
  {1}

  Returns:
    int64[k] sorted distinct indices i in [0, N) with p_i = t (mod b).

  Raises:
    ValueError: if cycle < 1 or q b > 1.
  """
  if cycle < 1 or sampling_rate * cycle > 1 + 1e-12:
    raise ValueError(f"cyclic sampling needs cycle >= 1 and rate q * cycle "
                     f"<= 1, got cycle={cycle}, q={sampling_rate:.3g}")
  candidates = sample_indices(seed, step, num_examples,
                              min(1.0, sampling_rate * cycle))
  if cycle == 1:
    return candidates
  return candidates[partition_of(seed, candidates, cycle) == step % cycle]


class Sampler:
  """Which rows step t of a phase reads: a mechanism's batch selection
  (`privacy.mechanisms`), called by the input pipeline.

  `__call__(seed, step, num_examples, sampling_rate)` -> int64[k] sorted
  distinct indices in [0, N), a pure function of the secret seed and the
  step (a resumed run rereads the same batches). `rows` > 0: every step
  reads exactly that many physical rows (the draw, then masked padding),
  so its time is constant; 0: as many as the draw (the realised size then
  shows in the step time). `fingerprint()`: what a resumed data pipeline
  must keep (JSON). Picklable: it runs in grain worker processes.
  """
  rows: int = 0

  def __call__(self, seed: int, step: int, num_examples: int,
               sampling_rate: float) -> np.ndarray:
    raise NotImplementedError

  def fingerprint(self) -> dict:
    return {}

  def __repr__(self) -> str:  # Public values only (a sampler holds no seed).
    args = ", ".join(f"{k}={v!r}" for k, v in self.fingerprint().items())
    return f"{type(self).__name__}({args})"


class Poisson(Sampler):
  """`sample_indices`: every index joins step t independently at rate q."""

  def __call__(self, seed, step, num_examples, sampling_rate):
    return sample_indices(seed, step, num_examples, sampling_rate)


class Cyclic(Sampler):
  """`sample_cyclic_indices` with cycle b (b = 1: `Poisson` exactly)."""

  def __init__(self, cycle: int):
    self.cycle = int(cycle)

  def __call__(self, seed, step, num_examples, sampling_rate):
    return sample_cyclic_indices(seed, step, num_examples, sampling_rate,
                                 self.cycle)

  def fingerprint(self) -> dict:
    return {"cycle": self.cycle} if self.cycle > 1 else {}


def poisson_sample(seed: int, step: int, num_examples: int,
                   sampling_rate: float, max_batch_size: int) -> PoissonBatch:
  """Poisson-samples a batch and pads it to ``max_batch_size`` rows.

  Formal guarantees: if ``truncated`` is never True, batches are exactly
  Poisson-subsampled (see ``sample_indices``). If the draw exceeds
  ``max_batch_size``, a uniformly random subset of ``max_batch_size`` real
  rows is kept; the mechanism is then truncated Poisson subsampling, whose
  privacy is given by ``TruncatedSubsampledGaussianDpEvent`` (use
  ``accounting.dp_event(..., sampling="truncated_poisson")``). Padding slots
  hold index 0 with mask 0 and must contribute nothing to the update.

  >>> b = poisson_sample(seed=1, step=0, num_examples=1000,
  ...                    sampling_rate=0.01, max_batch_size=32)
  >>> b.indices.shape, b.mask.shape, int(b.mask.sum()) == b.size
  ((32,), (32,), True)

  Args:
    seed: non-negative int; the sampling seed of the run.
    step: non-negative int; the logical training step.
    num_examples: dataset size N.
    sampling_rate: inclusion probability q.
    max_batch_size: physical batch size B (fixed shape).

  Returns:
    A ``PoissonBatch`` with indices int64[B], mask float32[B].
  """
  if max_batch_size < 1:
    raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
  idx = sample_indices(seed, step, num_examples, sampling_rate)
  truncated = idx.size > max_batch_size
  if truncated:
    rng = _rng(seed, step, _TRUNCATE_TAG)
    keep = _uniform_subset(rng, idx.size, max_batch_size)
    idx = idx[keep]
  size = int(idx.size)
  indices = np.zeros((max_batch_size,), np.int64)
  indices[:size] = idx
  mask = np.zeros((max_batch_size,), np.float32)
  mask[:size] = 1.0
  return PoissonBatch(indices, mask, size, bool(truncated))


def _binomial_sf(b: int, n: int, q: float) -> float:
  """P(Binomial(n, q) > b); scipy if available, else a Chernoff bound."""
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
    return float(stats.binom.sf(b, n, q))
  except ImportError:
    mean = n * q
    if b < mean:
      return 1.0
    # Chernoff: P(X >= (1+d)mu) <= exp(-d^2 mu / (2 + d)); an upper bound.
    d = (b + 1) / mean - 1.0 if mean > 0 else math.inf
    return math.exp(-d * d * mean / (2.0 + d)) if mean > 0 else 0.0


def max_batch_size_for(num_examples: int, sampling_rate: float,
                       overflow_prob: float = 1e-9) -> int:
  """Smallest b with P(Binomial(N, q) > b) <= overflow_prob.

  Use it as ``max_batch_size`` so truncation practically never happens.

  >>> max_batch_size_for(60000, 256 / 60000) > 256
  True

  Args:
    num_examples: dataset size N.
    sampling_rate: inclusion probability q.
    overflow_prob: allowed per-step probability that a draw is truncated.

  Returns:
    The physical batch size b (int >= 1).
  """
  _check_args(num_examples, sampling_rate)
  mean = num_examples * sampling_rate
  std = math.sqrt(max(mean * (1.0 - sampling_rate), 0.0))
  # Bracket [lo, hi] with sf(lo) > p (or lo == 0) and sf(hi) <= p, bisect.
  lo, hi = 0, int(min(num_examples, math.ceil(mean + 10 * std + 20)))
  while hi < num_examples and _binomial_sf(hi, num_examples,
                                           sampling_rate) > overflow_prob:
    hi = min(num_examples, 2 * hi + 1)
  if _binomial_sf(0, num_examples, sampling_rate) <= overflow_prob:
    return 1
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if _binomial_sf(mid, num_examples, sampling_rate) <= overflow_prob:
      hi = mid
    else:
      lo = mid
  return max(hi, 1)


def shard_for_process(indices: np.ndarray, mask: np.ndarray,
                      process_index: int, process_count: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """This process's contiguous slice of a padded batch (multi-host loading).

  Every process samples the same global batch from the same (seed, step) and
  loads only its slice; the slices, concatenated in process order along a
  ("data",) mesh axis, rebuild the global batch.

  >>> shard_for_process(np.arange(8), np.ones(8), 1, 4)
  (array([2, 3]), array([1., 1.]))

  Args:
    indices: [B] padded indices.
    mask: [B] mask.
    process_index: this process, in [0, process_count).
    process_count: number of processes; must divide B.

  Returns:
    (indices[B / P], mask[B / P]) for this process.
  """
  n = indices.shape[0]
  if mask.shape[0] != n:
    raise ValueError(f"indices ({n}) and mask ({mask.shape[0]}) differ.")
  if process_count < 1 or n % process_count:
    raise ValueError(f"batch size {n} must be divisible by process_count "
                     f"{process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count}).")
  per = n // process_count
  sl = slice(process_index * per, (process_index + 1) * per)
  return indices[sl], mask[sl]
