"""PrivacyLedger: the running privacy budget of a training run.

The ledger records DP-SGD steps as (noise_multiplier, sampling_rate,
sampling, max_batch_size) entries with a step count (consecutive identical
steps merge into one entry), computes epsilon(delta) of their composition,
and serialises to a JSON-compatible dict for checkpoints, so that a resumed
run continues its budget. Steps that touch no private data (public warm
start) are recorded with ``record_public`` and cost nothing.

Epsilon is cached: for PLD each entry's one-step PLD is built once and
self-composed per count, and the composition of all entries but the last is
kept, so recomputing epsilon every few steps costs one self-composition.
"""

import copy
import dataclasses
import math
from typing import Any, Optional

import dp_accounting

from dpjax.privacy import accounting


@dataclasses.dataclass
class _Entry:
  noise_multiplier: float
  sampling_rate: float
  sampling: str
  max_batch_size: Optional[int]
  count: int

  def key(self) -> tuple[Any, ...]:
    return (self.noise_multiplier, self.sampling_rate, self.sampling,
            self.max_batch_size)


class PrivacyLedger:
  """Records private steps and reports their epsilon.

  Formal guarantees: ``epsilon(delta)`` upper-bounds the privacy loss of the
  adaptive composition of all recorded steps (dp_accounting, PLD or RDP), if
  every step really ran the recorded mechanism (clip to C, one Gaussian draw
  of std sigma C, the recorded sampling on the ``num_examples`` dataset).

  >>> ledger = PrivacyLedger(num_examples=60000, delta=1e-5)
  >>> ledger.record(1.1, 256 / 60000, steps=100)
  >>> ledger.record(1.1, 256 / 60000, steps=100)
  >>> ledger.steps, len(ledger.to_dict()["entries"])
  (200, 1)
  >>> 0 < ledger.epsilon() < ledger.epsilon_after(1.1, 256 / 60000, 100)
  True
  """

  def __init__(self, num_examples: int, delta: Optional[float] = None,
               accountant: str = "pld"):
    """Creates an empty ledger.

    Args:
      num_examples: dataset size N (of the private data).
      delta: default target delta; defaults to N^-1.1, strictly below 1/N
        (delta = 1/N would allow releasing one record in the clear).
      accountant: "pld" or "rdp".
    """
    accounting._check(accountant, "poisson")  # pylint: disable=protected-access
    if num_examples <= 0:
      raise ValueError(f"num_examples must be > 0, got {num_examples}.")
    self.num_examples = int(num_examples)
    self.delta = float(float(num_examples) ** -1.1 if delta is None
                       else delta)
    self.accountant = accountant
    self.public_steps = 0
    self._entries: list[_Entry] = []
    self._unit_plds: dict[tuple[Any, ...], Any] = {}
    self._prefix: Optional[tuple[tuple[Any, ...], Any]] = None
    self._eps_cache: dict[tuple[Any, ...], float] = {}

  @property
  def steps(self) -> int:
    """Number of private steps recorded."""
    return sum(e.count for e in self._entries)

  @property
  def entries(self) -> list[dict[str, Any]]:
    return [dataclasses.asdict(e) for e in self._entries]

  def record(self, noise_multiplier: float, sampling_rate: float,
             steps: int = 1, sampling: str = "poisson",
             max_batch_size: Optional[int] = None) -> None:
    """Records ``steps`` private steps of one mechanism.

    Args:
      noise_multiplier: sigma (0 makes epsilon infinite).
      sampling_rate: q.
      steps: number of steps.
      sampling: "poisson", "truncated_poisson" or "without_replacement".
      max_batch_size: see ``accounting.dp_event``.
    """
    accounting._check(self.accountant, sampling)  # pylint: disable=protected-access
    if steps < 0:
      raise ValueError(f"steps must be >= 0, got {steps}.")
    if sampling == "truncated_poisson" and max_batch_size is None:
      raise ValueError("sampling='truncated_poisson' needs max_batch_size.")
    unsupported = {"pld": "without_replacement", "rdp": "truncated_poisson"}
    if unsupported[self.accountant] == sampling:
      raise ValueError(f"sampling={sampling!r} is not supported by "
                       f"accountant={self.accountant!r}.")
    if steps == 0 or sampling_rate == 0:
      return  # Touches no private example: costs nothing.
    entry = _Entry(float(noise_multiplier), float(sampling_rate), sampling,
                   None if max_batch_size is None else int(max_batch_size),
                   int(steps))
    if self._entries and self._entries[-1].key() == entry.key():
      self._entries[-1].count += entry.count
    else:
      self._entries.append(entry)

  def record_public(self, steps: int = 1) -> None:
    """Records steps on public data only; they cost no privacy."""
    self.public_steps += int(steps)

  def epsilon(self, delta: Optional[float] = None) -> float:
    """Epsilon of everything recorded, at ``delta`` (default: self.delta)."""
    delta = self.delta if delta is None else float(delta)
    key = (delta,) + tuple((e.key(), e.count) for e in self._entries)
    if key not in self._eps_cache:
      self._eps_cache[key] = self._compute_epsilon(delta)
    return self._eps_cache[key]

  def _compute_epsilon(self, delta: float) -> float:
    if not self._entries:
      return 0.0
    if any(e.noise_multiplier == 0 for e in self._entries):
      return math.inf
    if self.accountant == "rdp":
      events = [self._event(e) for e in self._entries]
      return accounting.event_epsilon(
          dp_accounting.ComposedDpEvent(events), delta, "rdp")
    return self._pld().get_epsilon_for_delta(delta)

  def _event(self, e: _Entry):
    return accounting.dp_event(e.noise_multiplier, e.sampling_rate, e.count,
                               e.sampling, self.num_examples,
                               e.max_batch_size)

  def _composed_pld(self, e: _Entry):
    if e.key() not in self._unit_plds:
      self._unit_plds[e.key()] = accounting.step_pld(
          e.noise_multiplier, e.sampling_rate, e.sampling, self.num_examples,
          e.max_batch_size)
    return self._unit_plds[e.key()].self_compose(e.count)

  def _pld(self):
    """PLD of all entries; the prefix (all but the last) is cached."""
    head = tuple((e.key(), e.count) for e in self._entries[:-1])
    if self._prefix is None or self._prefix[0] != head:
      prefix = None
      for e in self._entries[:-1]:
        p = self._composed_pld(e)
        prefix = p if prefix is None else prefix.compose(p)
      self._prefix = (head, prefix)
    last = self._composed_pld(self._entries[-1])
    prefix = self._prefix[1]
    return last if prefix is None else prefix.compose(last)

  def epsilon_after(self, noise_multiplier: float, sampling_rate: float,
                    steps: int = 1, sampling: str = "poisson",
                    max_batch_size: Optional[int] = None,
                    delta: Optional[float] = None) -> float:
    """Epsilon if ``steps`` more steps were recorded (ledger unchanged)."""
    other = copy.copy(self)
    other._entries = [dataclasses.replace(e) for e in self._entries]  # pylint: disable=protected-access
    other.record(noise_multiplier, sampling_rate, steps, sampling,
                 max_batch_size)
    return other.epsilon(delta)

  def would_exceed(self, target_epsilon: float, noise_multiplier: float,
                   sampling_rate: float, steps: int = 1,
                   sampling: str = "poisson",
                   max_batch_size: Optional[int] = None,
                   delta: Optional[float] = None) -> bool:
    """True if recording ``steps`` more steps would exceed the budget.

    Call it BEFORE running a step to stop before the budget is exceeded.
    """
    return self.epsilon_after(noise_multiplier, sampling_rate, steps,
                              sampling, max_batch_size,
                              delta) > target_epsilon

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable state (for orbax JsonSave)."""
    return {
        "num_examples": self.num_examples,
        "delta": self.delta,
        "accountant": self.accountant,
        "public_steps": self.public_steps,
        "entries": self.entries,
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "PrivacyLedger":
    """Inverse of ``to_dict``."""
    ledger = cls(int(d["num_examples"]), float(d["delta"]), d["accountant"])
    ledger.public_steps = int(d.get("public_steps", 0))
    for e in d["entries"]:
      ledger.record(e["noise_multiplier"], e["sampling_rate"], e["count"],
                    e["sampling"], e["max_batch_size"])
    return ledger

  def __repr__(self) -> str:
    return (f"PrivacyLedger(num_examples={self.num_examples}, "
            f"delta={self.delta}, accountant={self.accountant!r}, "
            f"steps={self.steps}, entries={len(self._entries)})")
