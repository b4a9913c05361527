"""The search behind `python -m dpjax.tune` (see its docstring).

Privacy of the search (privacy/tuning.py): K and every trial's values come
from OS entropy (never config.seed) and are kept owner-only in
<workdir>/private_tune.json; each trial is an ordinary dpjax run (its own
secret keys); the per-trial RDP curve is the pointwise max over the trials
as run (their results.json) and, when sigma, q or T are searched or
calibrated, over every combination of those fields' choices (the space's
support), predicted and checked against the trials that ran. The
prediction is the registered mechanism's own (privacy/mechanisms): each
private phase resolved as the loop resolves it records its whole phase in a
ledger (`Mechanism.record`), whose dp_accounting event gives the RDP curve;
a mechanism accounted by PLD only (truncated Poisson) has none and is
refused before any trial runs.
"""

import json
import math
import os
from typing import Any, Mapping

from absl import logging
import ml_collections
import numpy as np

from dpjax import errors
from dpjax import privacy
from dpjax import private_files
from dpjax import recipes
from dpjax.train import phase_plan
from dpjax.privacy import tuning
from dpjax.tune import space as tune_space

PUBLIC_SCORE_PREFIXES = ("eval", "eval_ema")
PRIVATE_SCORE_PREFIXES = ("private", "private_eval", "private_eval_ema",
                          "nonprivate")
STATE = "private_tune.json"


def check_score(score: str) -> None:
  """Refuses a score that is not an evaluation on public held-out data."""
  prefix = score.split("/", 1)[0] if "/" in score else ""
  if prefix in PRIVATE_SCORE_PREFIXES:
    raise errors.ConfigError(
        f"--score={score!r} is computed on private data without DP: "
        "selecting on it is not covered by any epsilon; use an evaluation "
        "on public held-out data (eval/... or eval_ema/...)")
  if prefix not in PUBLIC_SCORE_PREFIXES:
    raise errors.ConfigError(
        f"--score={score!r} is not an evaluation metric of results.json; "
        "use one on public held-out data (eval/... or eval_ema/...)")


def _distribution(spec: Mapping[str, Any]) -> tuning.Distribution:
  try:
    return tuning.distribution(
        spec["distribution"], mean=float(spec.get("mean", 0.0)),
        eta=float(spec.get("eta", 1.0)), gamma=float(spec.get("gamma", 0.0)))
  except ValueError as e:
    raise errors.ConfigError(f"--k_distribution/--k_mean/--k_eta/--k_gamma "
                             f"({dict(spec)}): {e}") from None


class Predictor:
  """RDP curve of a trial with given values, before it runs: its private
  phases' mechanisms resolved as the loop resolves them
  (`phase_plan.resolve_phases`: delta, knobs, sigma given or calibrated by
  the mechanism to the trial's target epsilon), each recording its whole
  phase in a ledger (`Mechanism.record`), whose event gives the curve."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config, self._curves = config, {}
    if config.get("audit") and config.audit.num_canaries:
      raise errors.config_error("audit.num_canaries",
                                config.audit.num_canaries,
                                "dpjax.tune needs 0 (canaries change N)")

  def _config(self, values: Mapping[str, Any], target: float | None):
    cfg = tune_space.apply(self.config, {k: v for k, v in values.items()
                                          if k in tune_space.PRIVACY_FIELDS})
    if target is not None:
      cfg.privacy.target_epsilon = float(target)
    return cfg

  def curve(self, values: Mapping[str, Any], target: float | None
            ) -> np.ndarray:
    """The trial's RDP curve at tuning.ORDERS (cached: calibration takes
    seconds)."""
    cfg = self._config(values, target)
    key = json.dumps([cfg.train.to_dict(), cfg.privacy.to_dict()],
                     sort_keys=True, default=str)
    if key not in self._curves:
      self._curves[key] = tuning.rdp_curve(_ledger(cfg).dp_event())
    return self._curves[key]

  def worst(self, space, target: float | None) -> np.ndarray:
    return tuning.worst_rdp([self.curve(c, target) for c in
                             tune_space.privacy_combinations(space)])


def check_accountable(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError (field, value, fix) unless the trials of `config`
  are DP runs whose ledger has an RDP curve (the bound needs one). Cheap:
  sigma is a placeholder (the kind of event does not depend on it)."""
  if config.privacy.tan_reference_batch_size:
    raise errors.config_error(
        "privacy.tan_reference_batch_size",
        config.privacy.tan_reference_batch_size, "a TAN simulation is not "
        "DP: search with --tan, or set 0 for an accounted search")
  if not tuning.supports_rdp(_ledger(_uncalibrated(config)).dp_event()):
    mechanism = config.privacy.get("mechanism", "dpsgd")
    raise errors.config_error(
        "privacy.mechanism", mechanism, f"dpjax.tune's bound (Papernot & "
        f"Steinke) needs each trial's RDP curve, and {mechanism!r} is "
        "accounted by PLD only (dp_accounting has no RDP bound for it); "
        'tune with "dpsgd" or another mechanism with an RDP curve '
        "(docs/tuning.md)")


def _plans(config) -> list:
  """The private phases' plans, as the loop resolves them."""
  if not config.privacy.enabled:
    raise errors.config_error(
        "privacy.enabled", False, "the trials would train without DP: a "
        "search of them has no epsilon; set True")
  plans = [p for p in phase_plan.resolve_phases(
      config, recipes.build(config).phases) if p.private]
  if not plans:
    raise errors.config_error("recipe", config.recipe, "it has no private "
                              "phase: there is nothing to account")
  return plans


def _uncalibrated(config):
  """`config` with sigma 1 where it would be calibrated: for what does not
  depend on sigma (delta, the kind of event), without the calibration."""
  out = config.copy_and_resolve_references()
  if out.privacy.noise_multiplier <= 0:
    out.privacy.noise_multiplier = 1.0
  return out


def _ledger(config) -> privacy.PrivacyLedger:
  """A ledger holding every private phase of `config` in full, as the
  loop's ledger would at the end of the run (loop.py: N and delta of the
  first private phase)."""
  plans = _plans(config)
  dp = plans[0].privacy
  ledger = privacy.PrivacyLedger(plans[0].num_examples, dp.delta,
                                 dp.accountant)
  for plan in plans:
    mechanism = plan.privacy.mechanism
    mechanism.record(ledger, 0, mechanism.steps)
  return ledger


def _trial_config(config, values, trial_target, tan_batch_size):
  cfg = tune_space.apply(config, values)
  if trial_target is not None:
    cfg.privacy.target_epsilon = float(trial_target)
  if tan_batch_size:
    cfg.privacy.tan_reference_batch_size = int(cfg.train.batch_size)
    cfg.train.batch_size = int(tan_batch_size)
    cfg.train.microbatch_size = min(cfg.train.microbatch_size,
                                    int(tan_batch_size))
  return cfg


def _state(config, workdir, space, k_spec, target_epsilon, tan):
  """The persisted search (K, values, per-trial target), or a new one."""
  path = os.path.join(workdir, STATE)
  started = dict(space=space, k=k_spec, target_epsilon=target_epsilon,
                 tan=tan)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      state = json.load(f)
    for key, value in started.items():
      if state["started"][key] != json.loads(json.dumps(value)):
        raise errors.ConfigError(
            f"dpjax.tune: {workdir} holds a search started with {key}="
            f"{state['started'][key]!r}, not {value!r}: resume it with the "
            "same flags and space, or use a new workdir")
    return state
  dist = _distribution(k_spec)
  tune_space.validate(space, config)
  if not tan:
    check_accountable(config)
  trial_target = None
  if target_epsilon is not None and not tan:
    if "privacy.target_epsilon" in space or "privacy.noise_multiplier" in \
        space or config.privacy.noise_multiplier > 0:
      raise errors.ConfigError(
          "--target_epsilon calibrates each trial's sigma: leave "
          "privacy.noise_multiplier (< 0) and privacy.target_epsilon out of "
          "the space")
    predictor = Predictor(config)
    delta = _delta(config)
    trial_target = tuning.calibrate_trial_epsilon(
        target_epsilon, delta, dist, lambda e: predictor.worst(space, e))
    logging.info("each trial's target epsilon: %.4g", trial_target)
  rng = np.random.default_rng()  # OS entropy: K and the values are secret.
  k = dist.sample(rng)
  state = dict(started=json.loads(json.dumps(started)), k=k,
               trials=[tune_space.draw(space, config, rng) for _ in range(k)],
               trial_target_epsilon=trial_target)
  os.makedirs(workdir, exist_ok=True)
  private_files.write_private_text(path, json.dumps(state, indent=1))
  return state


def _delta(config) -> float:
  """delta of the (first) private phase, as the loop sets it."""
  return _plans(_uncalibrated(config))[0].privacy.delta


def _run_trials(config, workdir, state, tan_batch_size, stop_after):
  """Runs the missing trials; returns their results, or a stop reason."""
  root = private_files.make_private_dir(os.path.join(workdir, "trials"))
  results, new = [], 0
  for i, values in enumerate(state["trials"]):
    trial_dir = os.path.join(root, str(i))
    path = os.path.join(trial_dir, "results.json")
    if not os.path.exists(path):
      if stop_after and new >= stop_after:
        return results, f"stopped after {new} new trial(s) (--stop_after)"
      cfg = _trial_config(config, values, state["trial_target_epsilon"],
                          tan_batch_size)
      out = recipes.run(cfg, trial_dir)
      new += 1
      if out.get("preempted"):
        return results, f"preempted in a trial at step {out['step']}"
    with open(path, encoding="utf-8") as f:
      results.append(json.load(f))
  return results, None


def _scores(results, score: str, mode: str) -> list[float]:
  """Each trial's score, oriented so that higher is better (-inf: none)."""
  out = []
  for r in results:
    if score not in r:
      evals = sorted(k for k in r if k.split("/")[0] in PUBLIC_SCORE_PREFIXES)
      raise errors.ConfigError(f"--score={score!r} is not in the trials' "
                               f"results.json; available: {evals}")
    v = float(r[score])
    out.append(-math.inf if not math.isfinite(v) else
               (v if mode == "max" else -v))
  return out


def _accounting(config, space, state, results) -> dict[str, Any]:
  """The search's epsilon (privacy/tuning.py) from the trials as run and,
  when sigma, q or T are searched or calibrated, every combination."""
  dist = _distribution(state["started"]["k"])
  if any(r.get("epsilon") is None for r in results):
    raise RuntimeError("dpjax.tune: a trial ran without DP (its results.json "
                       "has no epsilon): the search has no epsilon")
  curves = [tuning.results_rdp(r) for r in results]
  combos = tune_space.privacy_combinations(space)
  if combos != [{}] or state["trial_target_epsilon"] is not None:
    predictor = Predictor(config)
    target = state["trial_target_epsilon"]
    for r, values, curve in zip(results, state["trials"], curves):
      if r.get("stopped_at_budget"):
        continue
      if not np.allclose(predictor.curve(values, target), curve,
                         rtol=1e-6, equal_nan=True):
        raise RuntimeError(
            "dpjax.tune: a trial's recorded privacy differs from the one "
            "predicted for its values; the search's epsilon cannot be "
            "computed over the space's support")
    curves.append(predictor.worst(space, target))
  if not curves:
    return dict(epsilon=0.0, how="K = 0: nothing trained or released")
  delta = max(r["delta"] for r in results) if results else _delta(config)
  out = tuning.search_epsilon(tuning.ORDERS, tuning.worst_rdp(curves), dist,
                              delta)
  out["k_distribution"] = dist.describe()
  out["secret_randomness"] = all(r.get("secret_randomness") for r in results)
  return out


def search(config, workdir: str, space: dict, *, score: str,
           mode: str = "max", k_spec: Mapping[str, Any],
           target_epsilon: float | None = None, tan: bool = False,
           tan_batch_size: int = 0, stop_after: int = 0) -> dict[str, Any]:
  """Runs (or resumes) the search; returns tune/results.json's content, or
  {"stopped": reason} for a search to be resumed."""
  from dpjax.tune import report as tune_report  # pylint: disable=g-import-not-at-top
  check_score(score)
  if tan and not tan_batch_size:
    raise errors.ConfigError("--tan needs --tan_batch_size (the simulated "
                             "batch, smaller than train.batch_size)")
  state = _state(config, workdir, space, dict(k_spec), target_epsilon, tan)
  results, stopped = _run_trials(config, workdir, state,
                                 tan_batch_size if tan else 0, stop_after)
  if stopped:
    return dict(stopped=stopped)
  scores = _scores(results, score, mode)
  best = int(np.argmax(scores)) if results else None  # Ties: the first.
  out = dict(score=score, mode=mode, k=len(results),
             trials=[dict(values=v, score=r[score], epsilon=r.get("epsilon"),
                          tan_simulation=bool(r.get("tan_simulation")))
                     for v, r in zip(state["trials"], results)],
             released_trial=best,
             trial_target_epsilon=state["trial_target_epsilon"])
  if tan:
    out["search"] = dict(
        epsilon=None, how="TAN simulations: NOT a release and not DP. The "
        "hyper-parameters were chosen on private data without accounting; "
        "the final run's epsilon covers its training given them, not the "
        "choice.")
    if best is not None:
      final_dir = os.path.join(workdir, "final")
      cfg = _trial_config(config, state["trials"][best], None, 0)
      if target_epsilon is not None:
        cfg.privacy.target_epsilon = float(target_epsilon)
      final = recipes.run(cfg, final_dir)
      if final.get("preempted"):
        return dict(stopped=f"preempted in the final run at step "
                    f"{final['step']}")
      out["final"] = dict(values=state["trials"][best],
                          score=final.get(score), epsilon=final["epsilon"],
                          delta=final["delta"])
      tune_report.release(workdir, os.path.join(final_dir, "export"), out)
  else:
    out["search"] = _accounting(config, space, state, results)
    if best is not None:
      tune_report.release(workdir, os.path.join(workdir, "trials", str(best),
                                                "export"), out)
  tune_report.write(workdir, out, space)
  return out
