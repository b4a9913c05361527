"""Poisson-sampled Grain input pipelines, one process's share per step.

Design (why it looks like this). Each training step's batch is a pure
function of ``(seed, step)``: ``privacy.sampling.sample_indices`` draws the
exact Poisson batch (no truncation), and per-example randomness comes from
``(seed, step, index)``. So the pipeline is ``grain.MapDataset.range(start,
stop).map(StepLoader)``: element ``t`` is step ``t``'s fully loaded batch.
``StepLoader`` samples, keeps this process's rows, reads the records, runs
the transforms (decode, crop, tokenize, ...) and stacks them. With
``num_workers > 0``, ``IterDataset.mp_prefetch`` runs whole steps in grain
worker processes (worker w loads steps w, w+W, ...; grain restores step
order), so record reading and preprocessing never touch the training
process; with ``num_workers = 0`` it all runs in-process, giving identical
data. The iterator's state is ``{"next_step": t, ...}``: JSON-serialisable,
independent of the worker count, and enough to resume without replaying any
batch (it also works with ``grain.checkpoint.CheckpointHandler``, since the
iterator is a ``grain.DatasetIterator``). Nothing of size N is allocated.

Element layout for one step (this process p of P; global microbatch M):
  n_micro = max(1, ceil(b / M)) for the realised Poisson size b (varies!),
  or b = the sampler's fixed `rows` (e.g. truncated Poisson: constant);
  {"example": {field: [n_micro, M/P, ...], ...,
               "rng": uint32[n_micro, M/P, 2] (from (seed, step, index))},
   "mask": float32[n_micro, M/P],
   "bad_index": int64[n_micro, M/P], "bad_reason": int8[n_micro, M/P]
   (bad records, below),
   "step": int64 (0-d), "batch_size": int64 (0-d; b, global; a logged
   metric only -- never divide by it)}.
``element["example"]`` sliced at microbatch m is the batch pytree that
``loss_fn`` (vmapped) consumes.
The sorted sampled indices, padded to n_micro * M, are cut into microbatches
of M consecutive slots; process p keeps slots [p*M/P, (p+1)*M/P) of each.
Padding rows hold a copy of a real (transformed) record with mask 0 (the
first record that loads, normally record 0), so models never see
NaN-producing zeros; they must contribute nothing.

Bad records. A sampled row whose record fails to load -- ``BadRecord`` from
a source or transform (missing file, undecodable or truncated image, caption
with no tokens, missing field) or an ``OSError`` while reading or
transforming it -- becomes a padding row: the template, mask 0, rng 0, so it
contributes exactly zero, while N, q and the realised ``batch_size`` (and so
the accounting) are unchanged. The element records it in
  "bad_index": int64[n_micro, M/P] (the record's index; -1 for rows that
  loaded and for padding), "bad_reason": int8[n_micro, M/P] (0, or
  ``dpjax.data.reason_code``),
which the training loop accumulates in memory (``bad_records.BadRecordTally``) and
writes once, at the end of the run, to a private file: nothing is logged at
the step that drew the record (that would say when it was sampled), and
Python warnings raised while loading rows are silenced for the same reason.
Small sources are checked in full before training instead
(``bad_records.validate_phases``). Other exceptions (bugs) propagate.
"""

import dataclasses
import math
from typing import Any, Callable, Iterator, Sequence
import warnings

import grain
import numpy as np

from dpjax.data import BadRecord
from dpjax.data import DataValidationError
from dpjax.data import reason_code
from dpjax.data import transforms as transforms_lib
from dpjax.privacy import sampling

METADATA_KEYS = ("step", "batch_size")
# One record's data problem (BadRecord) or I/O failure (OSError, which
# includes Pillow's unidentified / truncated image errors).
_LOAD_ERRORS = (BadRecord, OSError)
# Records tried, from 0, for the padding template before giving up.
_TEMPLATE_TRIES = 64


def stack_records(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  out = {}
  for k in records[0]:
    vals = [r[k] for r in records]
    if isinstance(vals[0], (str, bytes)):
      raise TypeError(
          f"field {k!r} is {type(vals[0]).__name__}, which cannot be batched:"
          f" drop it (transforms.Keep([...])) or tokenize it "
          f"(transforms.Tokenize).")
    out[k] = np.stack([np.asarray(v) for v in vals])
  return out


@dataclasses.dataclass
class RowLoader:
  """Loads and transforms one example (row) of a batch."""
  source: Any
  transforms: Sequence[Any]
  seed: int = dataclasses.field(repr=False)  # Secret: never printed.

  def load(self, index: int, step: int) -> dict[str, Any]:
    rng = transforms_lib.example_generator(self.seed, step, index)
    return transforms_lib.apply(self.transforms, self.source[int(index)], rng)

  def try_load(self, index: int, step: int
               ) -> tuple[dict[str, Any] | None, int, Exception | None]:
    """(record, 0, None), or (None, reason code, error) for a bad record."""
    try:
      raw = self.source[int(index)]
    except _LOAD_ERRORS as e:
      return None, _code(e, "read"), e
    rng = transforms_lib.example_generator(self.seed, step, index)
    try:
      return transforms_lib.apply(self.transforms, raw, rng), 0, None
    except _LOAD_ERRORS as e:
      return None, _code(e, "decode"), e


def _code(error: Exception, default: str) -> int:
  return reason_code(error.reason if isinstance(error, BadRecord)
                     else default)


def describe_error(error: Exception) -> str:
  """One line naming a record's failure (its reason, else its type)."""
  if isinstance(error, BadRecord):
    return f"{error.reason}: {error}"
  return f"{type(error).__name__}: {error}"


def template_record(rows: RowLoader, num_examples: int) -> dict[str, Any]:
  """The padding record: the first of records 0, 1, ... that loads (at step
  0). Its rows always have mask 0, so which record it is does not matter.

  Raises:
    DataValidationError: none of the first records loads: the source or
      its config (fields, keys, tokenizer) is wrong, not one record.
  """
  failed = {}  # reason code -> [(index, error), ...]
  for i in range(max(1, min(num_examples, _TEMPLATE_TRIES))):
    rec, code, err = rows.try_load(i, 0)
    if rec is not None:
      return rec
    failed.setdefault(code, []).append((i, err))
  common = max(failed.values(), key=len)  # The most frequent reason.
  raise DataValidationError(
      f"data: none of the first {i + 1} records of {rows.source!r} can be "
      f"used ({len(common)} like record {common[0][0]}: "
      f"{describe_error(common[0][1])}). This is the data's configuration, "
      "not a few bad records: check data.source, data.fields and the image "
      "/ caption keys.")


def load_rows(rows: RowLoader, indices: Sequence[int], step: int,
              template: dict[str, Any], real: Sequence[bool] | None = None,
              quiet: bool = True) -> tuple[list[dict[str, Any]], np.ndarray]:
  """Loads rows ``indices`` at ``step``; bad records become ``template``.

  Args:
    rows: the row loader.
    indices: record indices.
    step: the step (per-example randomness).
    template: the padding record (``template_record``).
    real: optional bool per index; False rows are padding (not loaded).
    quiet: silence Python warnings while loading (their first appearance
      would show when a record that triggers one was drawn).

  Returns:
    (records, int8[len(indices)] reason codes: 0 = loaded or padding, else
    ``dpjax.data.reason_code`` of why the record is bad).
  """
  records, codes = [], np.zeros((len(indices),), np.int8)
  with warnings.catch_warnings():
    if quiet:
      warnings.simplefilter("ignore")
    for j, i in enumerate(indices):
      if real is not None and not real[j]:
        records.append(template)
        continue
      rec, codes[j], _ = rows.try_load(i, step)
      records.append(template if rec is None else rec)
  return records, codes


def process_slots(size: int, micro: int, process_index: int,
                   process_count: int) -> tuple[int, np.ndarray]:
  """(n_micro, int64[n_micro, M/P] global slot ids kept by this process)."""
  n_micro = max(1, math.ceil(size / micro))
  per = micro // process_count
  base = np.arange(n_micro, dtype=np.int64)[:, None] * micro
  return n_micro, base + process_index * per + np.arange(per)[None, :]


@dataclasses.dataclass
class StepLoader:
  """step -> this process's share of the Poisson batch (see module doc).

  Picklable; runs inside grain worker processes. Its repr (and so str()
  of a Grain dataset built on it) leaves out the secret seed.
  """
  source: Any
  transforms: Sequence[Any]
  sampling_rate: float
  global_microbatch: int
  seed: int = dataclasses.field(repr=False)  # Secret: never printed.
  process_index: int = 0
  process_count: int = 1
  add_rng: bool = True
  num_examples: int | None = None
  # Which rows each step reads: the phase mechanism's
  # (`privacy.mechanisms`); default Poisson at rate q.
  sampler: sampling.Sampler = dataclasses.field(
      default_factory=sampling.Poisson)
  _template: dict[str, Any] | None = dataclasses.field(default=None,
                                                       repr=False)

  def __post_init__(self):
    if self.num_examples is None:
      self.num_examples = len(self.source)
    check_division(self.global_microbatch, self.process_count)

  def template(self) -> dict[str, Any]:
    """The padding record: record 0 (else the first that loads) at step 0."""
    if self._template is None:
      self._template = template_record(
          RowLoader(self.source, self.transforms, self.seed),
          self.num_examples)
    return self._template

  def indices(self, step: int) -> np.ndarray:
    """Step `step`'s sorted global batch, drawn by `sampler` from the
    secret seed (Poisson at rate q over [0, N), or the mechanism's own
    selection, e.g. the exchangeable b-cyclic Poisson that BandMF's and
    BLT's accounting assume): the sampling the phase's accounting assumes.
    Every sampler decides per record from secret randomness, never from
    its neighbours (add/remove adjacency)."""
    return self.sampler(self.seed, step, self.num_examples,
                        self.sampling_rate)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    idx = self.indices(step)
    # A sampler with fixed `rows` pads every step to them (constant time).
    n_micro, slots = process_slots(max(idx.size, self.sampler.rows),
                                   self.global_microbatch,
                                    self.process_index, self.process_count)
    real = slots < idx.size
    flat_idx = np.where(real, idx[np.minimum(slots, max(idx.size - 1, 0))]
                        if idx.size else 0, 0).reshape(-1)
    rows = RowLoader(self.source, self.transforms, self.seed)
    flat_real = real.reshape(-1)
    records, codes = load_rows(rows, flat_idx, step, self.template(),
                               flat_real)
    ok = flat_real & (codes == 0)  # A bad record is a padding row.
    example = {k: v.reshape(slots.shape + v.shape[1:])
               for k, v in stack_records(records).items()}
    if self.add_rng:
      keys = transforms_lib.example_keys(self.seed, step, flat_idx)
      keys[~ok] = 0
      example["rng"] = keys.reshape(slots.shape + (2,))
    return {"example": example,
            "mask": ok.reshape(slots.shape).astype(np.float32),
            "bad_index": np.where(codes > 0, flat_idx, -1).astype(
                np.int64).reshape(slots.shape),
            "bad_reason": codes.reshape(slots.shape),
            "step": np.int64(step), "batch_size": np.int64(idx.size)}


def check_division(micro: int, process_count: int) -> None:
  if micro < 1 or micro % process_count:
    raise ValueError(
        f"data.global_microbatch={micro} must be a positive multiple of the "
        f"number of processes ({process_count}) (and of the data-parallel "
        "devices): round it up.")


def _process_info(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  return int(process_index), int(process_count)


def _ensure_flags_parsed() -> None:
  """grain's mp_prefetch reads absl flags; outside absl.app (notebooks,
  pytest) they are unparsed, so mark them parsed with their defaults."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class StepIterator(grain.DatasetIterator):
  """Iterates ``loader(step)`` for steps [next_step, stop), via grain.

  State: ``{"next_step": int, **fingerprint}`` (JSON). ``set_state`` checks
  the fingerprint (seed, rate, ...) and restarts the grain pipeline (and its
  workers) at ``next_step``.
  """

  def __init__(self, loader: Callable[[int], dict[str, np.ndarray]],
               start_step: int, stop_step: int, num_workers: int = 0,
               worker_buffer_size: int = 1,
               fingerprint: dict[str, Any] | None = None):
    super().__init__()
    self._loader, self._stop = loader, int(stop_step)
    self._num_workers = int(num_workers)
    self._buffer = int(worker_buffer_size)
    self._fingerprint = dict(fingerprint or {})
    self._it = None
    self._start(int(start_step))

  def _start(self, step: int) -> None:
    self.close()
    self._next_step = step
    ds = grain.MapDataset.range(step, max(step, self._stop)).map(
        self._loader).to_iter_dataset()
    if self._num_workers > 0:
      _ensure_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._num_workers,
          per_worker_buffer_size=self._buffer))
    self._it = iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._next_step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"next_step": self._next_step, **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    for k, v in self._fingerprint.items():
      if k in state and state[k] != v:
        # The seed of a private phase is secret: name it, never print it.
        saved, now = ("<secret>", "<secret>") if k == "seed" else (
            repr(state[k]), repr(v))
        raise ValueError(
            f"data pipeline state has {k}={saved} but this run has "
            f"{k}={now}: resume with the same data config or start afresh.")
    self._start(int(state["next_step"]))

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def poisson_batches(source: Any, *, sampling_rate: float,
                    global_microbatch: int, seed: int, num_steps: int,
                    start_step: int = 0, transforms: Sequence[Any] = (),
                    process_index: int | None = None,
                    process_count: int | None = None, num_workers: int = 0,
                    worker_buffer_size: int = 1, add_rng: bool = True,
                    num_examples: int | None = None,
                    sampler: sampling.Sampler | None = None
                    ) -> StepIterator:
  """Poisson-sampled batches of this process's share, steps [start, num_steps).

  Formal property: step t's global batch is exactly
  ``sampler(seed, t, len(source), sampling_rate)`` (default
  ``sampling.Poisson``: ``sampling.sample_indices``, never truncated); the
  union over processes and microbatches of rows with
  mask 1 is that set minus its bad records, which are the rows with
  ``bad_index`` >= 0 (mask 0: they contribute exactly zero).

  Args:
    source: random-access source (``__len__``, ``__getitem__ -> dict``).
    sampling_rate: Poisson rate q (expected batch q * len(source)).
    global_microbatch: M, rows per microbatch over all processes.
    seed: sampling / augmentation seed.
    num_steps: iteration stops before this step.
    start_step: first step produced (e.g. a checkpoint's step).
    transforms: grain Map/RandomMap transforms applied per record.
    process_index, process_count: default jax.process_index()/count().
    num_workers: grain worker processes (0: in-process).
    worker_buffer_size: steps prefetched per worker.
    add_rng: add the per-example "rng" uint32[2] leaf.
    num_examples: N to sample from (default len(source); records [0, N)).
    sampler: the batch selection (``StepLoader.indices``); default Poisson.

  Returns:
    A checkpointable iterator of dicts (layout in the module docstring).
  """
  p, n_proc = _process_info(process_index, process_count)
  loader = StepLoader(source, tuple(transforms), sampling_rate,
                      global_microbatch, seed, p, n_proc, add_rng,
                      num_examples, sampler or sampling.Poisson())
  fingerprint = {"seed": int(seed), "sampling_rate": float(sampling_rate),
                 "num_examples": int(loader.num_examples),
                 "global_microbatch": int(global_microbatch),
                 **loader.sampler.fingerprint()}
  return StepIterator(loader, start_step, num_steps, num_workers,
                      worker_buffer_size, fingerprint)


class PoissonBatches:
  """Iterable form of ``poisson_batches`` (same arguments; ``transforms``
  may be given positionally; ``num_examples`` overrides ``len(source)``).
  ``iter()`` returns a fresh checkpointable ``StepIterator``."""

  def __init__(self, source: Any, transforms: Sequence[Any] = (), *,
               num_examples: int | None = None, **kwargs: Any):
    self.source, self.transforms = source, tuple(transforms)
    self.num_examples, self.kwargs = num_examples, kwargs

  def __iter__(self) -> StepIterator:
    return poisson_batches(self.source, transforms=self.transforms,
                           num_examples=self.num_examples, **self.kwargs)
