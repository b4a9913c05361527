"""Bad records: start-up validation of small sources, and the private tally.

A record that cannot be read, decoded or tokenised must neither kill a long
run nor say when it was sampled. So (1) small sources (and `folder:`
sources) are read in full before training (`validate_phases`): every
problem is listed in one error, or with `data.on_bad_record=skip` counted
once, before any sampling; (2) in training, the pipeline turns a failing
row into a zero row (mask 0, N unchanged) and marks it in `bad_index` /
`bad_reason`; `BadRecordTally` collects those marks in memory and in the
(private) checkpoint, and reports them once, at the end of the run, in
<workdir>/private_bad_records.json (derived from private data: never
publish it).
"""

import concurrent.futures
import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from dpjax.data import BAD_REASONS
from dpjax.data import DataValidationError
from dpjax.data import pipeline
from dpjax.data import sources as sources_lib
from dpjax.errors import ConfigError


_MAX_LISTED = 1000  # records named in one validation error.


def find_bad_records(source: Any, transforms: Sequence[Any] = (), *,
                     num_threads: int | None = None
                     ) -> list[tuple[int, int, str]]:
  """Reads and transforms EVERY record as training would (randomised
  transforms with a fixed generator); returns ``(index, reason code,
  message)`` of each record that fails, in index order.

  Threads (``num_threads``, default min(8, CPUs)): Pillow decodes and
  resizes without the GIL. The randomness used here is not the run's.
  """
  rows = pipeline.RowLoader(source, tuple(transforms), 0)

  def check(i):
    rec, code, err = rows.try_load(i, 0)
    return None if rec is not None else (i, int(code), pipeline.describe_error(err))

  n = len(source)
  threads = num_threads or min(8, os.cpu_count() or 1)
  if threads > 1 and n > 1:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      results = list(pool.map(check, range(n)))
  else:
    results = [check(i) for i in range(n)]
  return [r for r in results if r is not None]


def _by_reason(codes: Sequence[int]) -> dict[str, int]:
  out = {}
  for c in codes:
    out[BAD_REASONS[int(c) - 1]] = out.get(BAD_REASONS[int(c) - 1], 0) + 1
  return dict(sorted(out.items()))


def validate_phases(phases: Sequence[tuple[str, Any, Sequence[Any]]], *,
                    on_bad_record: str = "error",
                    max_records: int = 100_000
                    ) -> dict[str, list[tuple[int, int, str]]]:
  """Start-up check of every record of the small sources, before training.

  A source is checked in full when it has at most ``max_records`` records,
  or is a ``folder:`` source and ``on_bad_record="error"``; generated
  (synthetic) sources and larger ones are not (their bad records become
  zero rows during training).

  Args:
    phases: (phase name, source, transforms) of each phase.
    on_bad_record: "error": any bad record is an error listing them all;
      "skip": they are logged as a count (at start-up, so independent of
      sampling) and become zero rows in training.
    max_records: size threshold (config.data.validate_max_records).

  Returns:
    {phase name: [(index, reason code, message), ...]} of the checked
    phases (empty lists when clean).

  Raises:
    DataValidationError: on_bad_record="error" and a checked source has
      bad records; the message names every one (up to 1000), counts them
      by reason and says how to fix it.
  """
  if on_bad_record not in ("error", "skip"):
    raise ConfigError(f"config.data.on_bad_record={on_bad_record!r} is "
                      'invalid: use "error" or "skip"')
  found, problems = {}, []
  for name, source, ts in phases:
    if sources_lib.is_generated(source):
      continue
    n = len(source)
    folder = sources_lib.is_folder(source)
    if n > max_records and not (folder and on_bad_record == "error"):
      logging.info("data: phase %s has %d records (> data.validate_max_"
                   "records=%d): not validated at start-up; records that "
                   "fail in training become zero rows", name, n, max_records)
      continue
    logging.info("data: validating the %d records of phase %s", n, name)
    bad = find_bad_records(source, ts)
    found[name] = bad
    if not bad:
      continue
    counts = ", ".join(f"{k}: {v}" for k, v in
                       _by_reason([c for _, c, _ in bad]).items())
    if on_bad_record == "skip":
      logging.warning(
          "data: %d of %d records of phase %s cannot be used (%s); "
          "data.on_bad_record=skip: they are zero rows in training (N is "
          "unchanged) and are listed at the end of the run in the private "
          "file private_bad_records.json", len(bad), n, name, counts)
      continue
    lines = [f"phase {name!r}: {len(bad)} of {n} records cannot be used "
             f"({counts}); source {source!r}:"]
    for i, code, message in bad[:_MAX_LISTED]:
      what = sources_lib.describe(source, i)
      lines.append(f"  record {i}{f' ({what})' if what else ''}: {message}")
    if len(bad) > _MAX_LISTED:
      lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
    problems.append("\n".join(lines))
  if problems:
    raise DataValidationError(
        "data: bad records found before training\n" + "\n".join(problems) +
        "\nFix: remove these records (for a folder: source, their rows in "
        "captions.jsonl / captions.csv) or repair them; or set "
        "--config.data.on_bad_record=skip to train with them as zero rows "
        "(they stay in N, which is conservative, and are listed at the end "
        "of the run in <workdir>/private_bad_records.json).")
  return found


BAD_RECORDS_FILE = "private_bad_records.json"


class BadRecordTally:
  """Bad records met in training: {phase: {index: [reason code, draws]}}.

  Fed every element (``add``); kept in memory and in the (private)
  checkpoint meta (``state`` / ``from_state``, JSON); reported once, at the
  end of the run (``report``). Never logged per step.
  """

  def __init__(self):
    self.phases: dict[str, dict[int, list[int]]] = {}

  def add(self, phase: str, element: dict[str, Any]) -> None:
    bad = element.get("bad_index")
    if bad is None:
      return
    bad = np.asarray(bad).reshape(-1)
    sel = bad >= 0
    if not sel.any():
      return
    reasons = np.asarray(element["bad_reason"]).reshape(-1)[sel]
    table = self.phases.setdefault(phase, {})
    for i, r in zip(bad[sel].tolist(), reasons.tolist()):
      table.setdefault(int(i), [int(r), 0])[1] += 1

  def merge(self, other: "BadRecordTally") -> "BadRecordTally":
    for phase, table in other.phases.items():
      mine = self.phases.setdefault(phase, {})
      for i, (r, n) in table.items():
        mine.setdefault(i, [r, 0])[1] += n
    return self

  def num_records(self, phases: Sequence[str] | None = None) -> int:
    return sum(len(t) for p, t in self.phases.items()
               if phases is None or p in phases)

  def num_draws(self, phases: Sequence[str] | None = None) -> int:
    return sum(n for p, t in self.phases.items()
               if phases is None or p in phases for _, n in t.values())

  def state(self) -> dict[str, list[list[int]]]:
    """JSON: {phase: [[index, reason code, draws], ...]} (sorted)."""
    return {p: [[i, r, n] for i, (r, n) in sorted(t.items())]
            for p, t in sorted(self.phases.items()) if t}

  @classmethod
  def from_state(cls, state: dict[str, Any] | None) -> "BadRecordTally":
    out = cls()
    for p, rows in (state or {}).items():
      out.phases[p] = {int(i): [int(r), int(n)] for i, r, n in rows}
    return out

  def allgather(self, phase_names: Sequence[str]) -> "BadRecordTally":
    """The sum over all processes (each loads only its own rows); a
    collective: every process calls it at the same point. One process: a
    copy."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return BadRecordTally().merge(self)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ids = {p: k for k, p in enumerate(phase_names)}
    # int32 columns (jax without x64): phase, index high/low words,
    # reason, draws.
    rows = np.asarray(
        [[ids[p], i >> 31, i & 0x7FFFFFFF, r, n]
         for p, t in self.phases.items() for i, (r, n) in t.items()],
        np.int64).reshape(-1, 5)
    sizes = np.asarray(multihost_utils.process_allgather(
        np.int32(rows.shape[0]))).reshape(-1)
    width = max(1, int(sizes.max()))
    padded = np.full((width, 5), -1, np.int32)
    padded[:rows.shape[0]] = rows
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    out = BadRecordTally()
    for proc, size in enumerate(sizes):
      for ph, hi, lo, r, n in gathered[proc][:int(size)].astype(np.int64):
        table = out.phases.setdefault(phase_names[int(ph)], {})
        table.setdefault(int(hi << 31 | lo), [int(r), 0])[1] += int(n)
    return out

  def report(self, phases: Sequence[tuple[str, bool, Any]],
             startup: dict[str, list[tuple[int, int, str]]] | None = None
             ) -> dict[str, Any]:
    """The content of <workdir>/private_bad_records.json.

    Args:
      phases: (name, private, source) of every phase of the run.
      startup: ``validate_phases``'s findings (data.on_bad_record=skip).
    """
    out = {
        "WARNING": (
            "DERIVED FROM PRIVATE DATA, NOT COVERED BY EPSILON: which "
            "records of the training data could not be used and how many "
            "times each was drawn (which reveals how often it was sampled)."
            " For the person running the job; do not publish (like "
            "checkpoints/ and the private/ metrics)."),
        "reasons": list(BAD_REASONS),
        "phases": {},
    }
    for name, private, source in phases:
      table = self.phases.get(name, {})
      records = []
      for i, (r, n) in sorted(table.items()):
        rec = {"index": i, "reason": BAD_REASONS[r - 1], "draws": n}
        what = sources_lib.describe(source, i)
        if what:
          rec["name"] = what
        records.append(rec)
      entry = {"private": bool(private), "bad_records": len(records),
               "bad_draws": sum(n for _, n in table.values()),
               "by_reason": _by_reason([r for r, _ in table.values()]),
               "records": records}
      if startup and name in startup:
        entry["found_at_startup"] = [
            {"index": i, "reason": BAD_REASONS[c - 1], "message": m}
            for i, c, m in startup[name]]
      out["phases"][name] = entry
    return out
