"""PrivacyLedger: the running privacy budget of a training run.

The ledger records DP-SGD steps as (noise_multiplier, sampling_rate,
sampling, max_batch_size) entries with a step count (consecutive identical
steps merge into one entry), computes epsilon(delta) of their composition,
and serialises to a JSON-compatible dict for checkpoints, so that a resumed
run continues its budget. Steps that touch no private data (public warm
start) are recorded with ``record_public`` and cost nothing. Mechanisms that
are (parts of) Gaussian mechanisms without amplification (BLT noise,
``privacy.blt``) are recorded with ``record_gaussian`` as rho = 1 / sigma^2:
Gaussian mechanisms compose exactly by adding rho, so all such entries
together are one Gaussian mechanism with noise multiplier 1 / sqrt(rho),
composed with the DP-SGD entries.

Epsilon is cached: for PLD each entry's one-step PLD is built once and
self-composed per count, and the composition of all entries but the last is
kept, so recomputing epsilon every few steps costs one self-composition.
"""

import copy
import dataclasses
import math
from typing import Any, Optional

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib

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


@dataclasses.dataclass
class _GaussianEntry:
  """A Gaussian mechanism of noise multiplier rho^-1/2 over `count` steps."""
  rho: float
  count: int
  kind: str = "gaussian"

  def key(self) -> tuple[Any, ...]:
    return (self.kind, self.rho)


class PrivacyLedger:
  """Records private steps and reports their epsilon.

  Formal guarantees: ``epsilon(delta)`` upper-bounds the privacy loss of the
  adaptive composition of all recorded steps (dp_accounting, PLD or RDP), if
  every step really ran the recorded mechanism (clip to C, one Gaussian draw
  of std sigma C, the recorded sampling on the ``num_examples`` dataset);
  for ``record_gaussian`` entries, that the steps together were a Gaussian
  mechanism of the recorded rho).

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
    accounting.check_supported(accountant, "poisson")
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

  @property
  def _dpsgd(self) -> list[_Entry]:
    return [e for e in self._entries if isinstance(e, _Entry)]

  @property
  def rho(self) -> float:
    """Sum of the Gaussian entries' rho (0: none)."""
    return sum(e.rho for e in self._entries if isinstance(e, _GaussianEntry))

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
    accounting.check_supported(self.accountant, sampling)
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

  def record_gaussian(self, rho: float, steps: int = 1) -> None:
    """Records ``steps`` private steps that are together a Gaussian
    mechanism with noise multiplier rho^-1/2 (sensitivity / noise std,
    squared), without sampling amplification. Consecutive calls add up
    into one entry (rho adds under composition).

    >>> ledger = PrivacyLedger(num_examples=1000, delta=1e-5)
    >>> ledger.record_gaussian(0.25, steps=3)
    >>> ledger.record_gaussian(0.75, steps=2)
    >>> ledger.entries
    [{'rho': 1.0, 'count': 5, 'kind': 'gaussian'}]
    """
    if steps < 0 or not rho >= 0:
      raise ValueError(f"need steps >= 0 and rho >= 0, got {steps}, {rho}.")
    if steps == 0:
      return
    last = self._entries[-1] if self._entries else None
    if isinstance(last, _GaussianEntry):
      last.rho += float(rho)
      last.count += int(steps)
    else:
      self._entries.append(_GaussianEntry(float(rho), int(steps)))

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
    dpsgd, rho = self._dpsgd, self.rho
    if not dpsgd and not rho:
      return 0.0
    if any(e.noise_multiplier == 0 for e in dpsgd) or rho == math.inf:
      return math.inf
    if self.accountant == "rdp":
      return accounting.event_epsilon(self.dp_event(), delta, "rdp")
    pld = self._pld(dpsgd) if dpsgd else None
    if rho:
      # As dp_accounting's PLDAccountant builds a GaussianDpEvent's PLD.
      gauss = pld_lib.from_gaussian_mechanism(
          standard_deviation=rho ** -0.5,
          value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION,
          neighboring_relation=(
              dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE))
      pld = gauss if pld is None else pld.compose(gauss)
    return pld.get_epsilon_for_delta(delta)

  def dp_event(self) -> dp_accounting.ComposedDpEvent:
    """The dp_accounting event of everything recorded: each DP-SGD entry's
    event, then the Gaussian entries as one GaussianDpEvent(rho^-1/2) (what
    `epsilon` accounts; tuning reads its RDP curve from it)."""
    events = [self._event(e) for e in self._dpsgd]
    if self.rho:
      events.append(dp_accounting.GaussianDpEvent(self.rho ** -0.5))
    return dp_accounting.ComposedDpEvent(events)

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

  def _pld(self, entries: list[_Entry]):
    """PLD of DP-SGD `entries`; the prefix (all but the last) is cached."""
    head = tuple((e.key(), e.count) for e in entries[:-1])
    if self._prefix is None or self._prefix[0] != head:
      prefix = None
      for e in entries[:-1]:
        p = self._composed_pld(e)
        prefix = p if prefix is None else prefix.compose(p)
      self._prefix = (head, prefix)
    last = self._composed_pld(entries[-1])
    prefix = self._prefix[1]
    return last if prefix is None else prefix.compose(last)

  def epsilon_after(self, noise_multiplier: float, sampling_rate: float,
                    steps: int = 1, sampling: str = "poisson",
                    max_batch_size: Optional[int] = None,
                    delta: Optional[float] = None) -> float:
    """Epsilon if ``steps`` more steps were recorded (ledger unchanged)."""
    other = self.copy()
    other.record(noise_multiplier, sampling_rate, steps, sampling,
                 max_batch_size)
    return other.epsilon(delta)

  def copy(self) -> "PrivacyLedger":
    """A ledger with these entries that records independently (it shares
    the epsilon caches, which are keyed by the entries)."""
    other = copy.copy(self)
    other._entries = [dataclasses.replace(e) for e in self._entries]
    return other

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
      if e.get("kind") == "gaussian":
        ledger.record_gaussian(e["rho"], e["count"])
        continue
      ledger.record(e["noise_multiplier"], e["sampling_rate"], e["count"],
                    e["sampling"], e["max_batch_size"])
    return ledger

  def __repr__(self) -> str:
    return (f"PrivacyLedger(num_examples={self.num_examples}, "
            f"delta={self.delta}, accountant={self.accountant!r}, "
            f"steps={self.steps}, entries={len(self._entries)})")
