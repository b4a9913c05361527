"""The search behind `python -m dpjax.tune` (see its docstring).

Privacy of the search (privacy/tuning.py): K and every trial's values come
from OS entropy (never config.seed) and are kept owner-only in
<workdir>/private_tune.json; each trial is an ordinary dpjax run (its own
secret keys); the per-trial RDP curve is the pointwise max over the trials
as run (their results.json) and, when sigma, q or T are searched or
calibrated, over every combination of those fields' choices (the space's
support), predicted and checked against the trials that ran.
"""

import functools
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


def _private_phases(config) -> list[tuple[int, int, int]]:
  """(N, expected batch, steps) of each private phase of `config`."""
  return [(p.num_examples, p.batch_size, p.steps)
          for p in recipes.build(config).phases if p.private]


class _Predictor:
  """RDP curve of a trial with given values, before it runs (DP-SGD):
  sigma as the loop resolves it (given, or calibrated to the trial's
  target epsilon for each private phase), composed over the phases."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config, self._phases = config, {}
    p = config.privacy
    if p.get("mechanism", "dpsgd") != "dpsgd" or p.tan_reference_batch_size:
      raise errors.ConfigError(
          "--space/--target_epsilon: searching sigma, q or T (or calibrating "
          "the search) is accounted for privacy.mechanism='dpsgd' without "
          "TAN simulation only")
    if config.get("audit") and config.audit.num_canaries:
      raise errors.ConfigError("dpjax.tune: config.audit.num_canaries must be "
                               "0 (canaries change N)")

  def curve(self, values: Mapping[str, Any], target: float | None
            ) -> np.ndarray:
    cfg = tune_space.apply(self.config, {k: v for k, v in values.items()
                                          if k in tune_space.PRIVACY_FIELDS})
    key = json.dumps(cfg.train.to_dict(), sort_keys=True, default=str)
    if key not in self._phases:
      self._phases[key] = _private_phases(cfg)
    p = cfg.privacy
    target = p.target_epsilon if target is None else target
    out = np.zeros(len(tuning.ORDERS))
    for n, batch, steps in self._phases[key]:
      delta = p.delta if p.delta > 0 else float(n) ** -1.1
      q = batch / n
      sigma = p.noise_multiplier if p.noise_multiplier > 0 else (
          _calibrated(target, q, steps, delta, p.accountant))
      out = out + tuning.dpsgd_rdp(sigma, q, steps)
    return out

  def worst(self, space, target: float | None) -> np.ndarray:
    return tuning.worst_rdp([self.curve(c, target) for c in
                             tune_space.privacy_combinations(space)])


@functools.lru_cache(maxsize=256)
def _calibrated(target: float, q: float, steps: int, delta: float,
                accountant: str) -> float:
  """sigma as the loop calibrates it (DP-SGD; seconds each, so cached)."""
  return privacy.calibrate_noise_multiplier(target, q, steps, delta,
                                            accountant=accountant)


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
  trial_target = None
  if target_epsilon is not None and not tan:
    if "privacy.target_epsilon" in space or "privacy.noise_multiplier" in \
        space or config.privacy.noise_multiplier > 0:
      raise errors.ConfigError(
          "--target_epsilon calibrates each trial's sigma: leave "
          "privacy.noise_multiplier (< 0) and privacy.target_epsilon out of "
          "the space")
    predictor = _Predictor(config)
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
  if config.privacy.delta > 0:
    return float(config.privacy.delta)
  return float(_private_phases(config)[0][0]) ** -1.1


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
  curves = [tuning.results_rdp(r) for r in results]
  combos = tune_space.privacy_combinations(space)
  if combos != [{}] or state["trial_target_epsilon"] is not None:
    predictor = _Predictor(config)
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
