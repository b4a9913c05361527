"""What a run's epsilon rests on, as it RAN: recorded in every checkpoint.

A resumed run reads a config that may differ from the one that started it;
its report (results.json, logs) must describe what ran, not the new config.
Each checkpoint's meta holds this record (`AsRun.to_dict`); the ledger next
to it holds every private step's mechanism. What the report then says
(PRIVACY.md, "Resuming"):

* `secret_sampling`: whether the sampling key in use was secret. It is
  drawn once, when the run starts, and restored on every resume, so a new
  `privacy.sampling_seed` changes nothing and the record decides.
* `secret_noise`: whether EVERY private phase's noise key was secret (AND
  over the phases entered). A phase's key is drawn when it is entered (from
  the config of that moment) and restored on resume.
* `<phase>/<fact>` of a phase that started: as it ran. A DP-SGD or public
  phase may continue under another sigma, q or batch size (the ledger
  accounts each step's own): such a field is then a list of [value, steps]
  in the order run. Any other fact of a started phase (clip norm, N,
  privacy unit, whether it is private, ...) must be unchanged: `check`
  raises a ConfigError naming the field. `<phase>/steps` counts the steps
  the phase ran (0 for a phase never reached).
* delta and accountant are the new config's; the loop recomputes the
  ledger's epsilon at that delta under that accountant (every recorded
  step's (epsilon(delta), delta) is a guarantee at any delta).
"""

import json
from typing import Any, Sequence

from absl import logging

from dpjax import errors
from dpjax import privacy

# Facts a DP-SGD (or public) phase may change on resume: each step's own
# (sigma, q) is in the ledger, so the report lists them as run.
VARYING = ("noise_multiplier", "sampling_rate", "batch_size")
# Config field behind each fact, for refusals.
_FIELDS = dict(private="privacy.enabled", num_examples="data.num_examples",
               batch_size="train.batch_size",
               sampling_rate="train.batch_size",
               noise_multiplier="privacy.noise_multiplier",
               l2_clip_norm="privacy.l2_clip_norm",
               l2_sensitivity="privacy.l2_clip_norm",
               privacy_unit="recipe", clipping="privacy.clipping")


def facts(plan) -> dict[str, Any]:
  """`plan.describe()` without the "<name>/" prefix, as JSON would restore
  it (lists, plain floats), so recorded and current facts compare equal."""
  out = {k.split("/", 1)[1]: v for k, v in plan.describe().items()}
  return json.loads(json.dumps(out, default=float))


def _varying(plan) -> tuple[str, ...]:
  """Facts of `plan` that may change between its steps."""
  return VARYING if plan.per_step_accounting else ()


def _field(plan, key: str) -> str:
  """The config field behind fact `key` of `plan` (for refusals)."""
  own = plan.mechanism.fields if plan.mechanism else {}
  return own.get(key) or _FIELDS.get(key, key)


class AsRun:
  """Per phase entered: name, facts, steps run, noise-key secrecy and the
  segments of its varying facts; plus the sampling key's secrecy."""

  def __init__(self, secret_sampling: bool, phases: Sequence[dict] = ()):
    self.secret_sampling = bool(secret_sampling)
    self.phases = [dict(p) for p in phases]

  def to_dict(self, index: int | None = None,
              phase_step: int = 0) -> dict[str, Any]:
    """JSON for the checkpoint meta; with `index`, phase `index` at
    `phase_step` steps run."""
    phases = [dict(p) for p in self.phases]
    if index is not None:
      phases[index]["steps"] = int(phase_step)
    return dict(secret_sampling=self.secret_sampling, phases=phases)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AsRun":
    return cls(d["secret_sampling"], d["phases"])

  @classmethod
  def legacy(cls, plans, index: int, phase_step: int) -> "AsRun":
    """A checkpoint written before this record: its keys are NOT known to
    be secret (reported so), and its phases are assumed to have run as
    planned."""
    out = cls(False)
    for i in range(index + 1):
      out.enter(i, plans[i], secret_noise=False if plans[i].private else None)
      out.advance(i, plans[i].steps if i < index else phase_step)
    return out

  def enter(self, index: int, plan, secret_noise: bool | None) -> None:
    """Phase `index` starts with `plan` (secret_noise: None if public)."""
    if index != len(self.phases):
      raise ValueError(f"phase {index} entered after {len(self.phases)}")
    f = facts(plan)
    self.phases.append(dict(
        name=plan.name, facts=f, steps=0, secret_noise=secret_noise,
        segments=[dict({k: f[k] for k in _varying(plan) if k in f},
                       start=0)]))

  def advance(self, index: int, phase_step: int) -> None:
    self.phases[index]["steps"] = int(phase_step)

  def check(self, plans, index: int, phase_step: int) -> None:
    """Resuming phase `index` at `phase_step` under `plans`: raises a
    ConfigError if a started phase's facts changed where the report could
    not say what ran; records a new segment of the current phase's varying
    facts if they changed."""
    for i, rec in enumerate(self.phases[:index + 1]):
      plan = plans[i]
      if plan.name != rec["name"]:
        raise errors.ConfigError(
            f"config: phase {i} is {plan.name!r} here, but the checkpoint's "
            f"phase {i} ran as {rec['name']!r}: resume with the checkpoint's "
            "phases (config.phases, privacy.enabled, ...) or start a new "
            "workdir")
      now, varying = facts(plan), _varying(plan)
      for key, saved in rec["facts"].items():
        if key == "steps" or key in varying or now.get(key) == saved:
          continue
        raise errors.config_error(
            _field(plan, key), now.get(key),
            f"phase {rec['name']!r} of the checkpoint ran with {key}="
            f"{saved!r}, and its report (results.json) would be false; "
            "resume with the checkpoint's value, or start a new workdir")
    rec, plan = self.phases[index], plans[index]
    now = {k: v for k, v in facts(plan).items() if k in _varying(plan)}
    last = rec["segments"][-1]
    if now and any(last.get(k) != v for k, v in now.items()):
      if last["start"] == phase_step:
        rec["segments"].pop()
      rec["segments"].append(dict(now, start=int(phase_step)))
    rec["steps"] = int(phase_step)

  @property
  def secret_noise(self) -> bool:
    """Every private phase entered had a secret noise key."""
    return all(p["secret_noise"] for p in self.phases
               if p["secret_noise"] is not None)

  def describe(self, plans) -> dict[str, Any]:
    """"<phase>/<fact>" of every phase: as run if it started (varying facts
    as a value, or [value, steps] pairs), else planned with 0 steps."""
    out = {}
    for i, plan in enumerate(plans):
      if i >= len(self.phases):
        f = dict(facts(plan), steps=0)
      else:
        rec = self.phases[i]
        f = dict(rec["facts"], steps=rec["steps"])
        f.update(_as_run(rec["segments"], rec["steps"]))
      out.update({f"{plan.name}/{k}": v for k, v in f.items()})
    return out


def _as_run(segments: list[dict], steps: int) -> dict[str, Any]:
  """Each varying fact: its value if one ran, else [[value, steps], ...]
  (consecutive equal values merged; segments that ran no step dropped)."""
  ends = [s["start"] for s in segments[1:]] + [steps]
  ran = [(s, e - s["start"]) for s, e in zip(segments, ends)
         if e > s["start"]] or [(segments[0], 0)]
  out = {}
  for key in (k for k in segments[0] if k != "start"):
    pairs = []
    for seg, n in ran:
      if pairs and pairs[-1][0] == seg[key]:
        pairs[-1][1] += n
      else:
        pairs.append([seg[key], n])
    out[key] = pairs[0][0] if len(pairs) == 1 else pairs
  return out


def restore(meta: dict[str, Any], plans) -> AsRun:
  """The record of a checkpoint's `meta`, checked against `plans`
  (`AsRun.check`); a checkpoint without one gets `AsRun.legacy`."""
  index, step = meta["phase"], meta["phase_step"]
  if index >= len(plans):
    raise errors.ConfigError(
        f"config: the checkpoint is in phase {index}, but this config has "
        f"{len(plans)} phases: resume with the checkpoint's phases (e.g. "
        "config.phases) or start a new workdir")
  if "as_run" in meta:
    out = AsRun.from_dict(meta["as_run"])
  else:
    logging.warning("the checkpoint does not record whether its keys were "
                    "secret: reported as not secret")
    out = AsRun.legacy(plans, index, step)
  out.check(plans, index, step)
  return out


def resumed_ledger(saved: dict[str, Any],
                   current: privacy.PrivacyLedger) -> privacy.PrivacyLedger:
  """The checkpoint's ledger (every private step run, as run) at the
  CURRENT config's delta and accountant, the ones the report prints; or
  `current` if no private step ran yet."""
  ledger = privacy.PrivacyLedger.from_dict(
      dict(saved, delta=current.delta, accountant=current.accountant))
  if not ledger.steps:
    return current
  if (saved["delta"], saved["accountant"]) != (current.delta,
                                               current.accountant):
    logging.info("resumed under delta %.3g (%s; was %.3g, %s): epsilon is "
                 "recomputed for every step at the new values",
                 current.delta, current.accountant, saved["delta"],
                 saved["accountant"])
  return ledger


def public_keys(record: AsRun, plans, noise_seed: int) -> list[str]:
  """Which keys ("noise", "sampling") of the run are not secret: those in
  use (the record) and the noise keys of private phases still to enter
  (this config's `privacy.noise_seed`)."""
  to_enter = any(p.private for p in plans[len(record.phases):])
  public = dict(noise=not record.secret_noise or (to_enter and noise_seed >= 0),
                sampling=not record.secret_sampling)
  return [name for name, yes in public.items() if yes]
