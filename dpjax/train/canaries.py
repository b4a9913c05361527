"""`config.audit`: input-space canaries in a recipe's run, audited at the end.

Before training, the recipe's private phase makes ``m`` canary records
(`Phase.canaries`); each is appended to the private data independently with
probability 1/2 (`privacy.audit.choose_included`), so the inserted ones are
ordinary members of the dataset: Poisson-sampled, clipped, noised and counted
in N, from which the run's delta is computed (N^-1.1 by default; a
`:paper` preset states its paper's; PRIVACY.md). After training every
canary is scored (by default ``-loss_fn(final params, canary)``; a recipe
may define `Phase.canary_scores`) and the one-run audit of Steinke, Nasr
and Jagielski (2023) turns the scores into an empirical epsilon lower bound at
``config.audit.delta``, written to ``<workdir>/audit.json`` beside the
accountant's epsilon at the same delta.

Canaries never reach the evaluators (those read held-out public data) and
their scores are written only to audit.json. Like every private example,
sampled canaries do enter the aggregate training metrics logged under
"private/".
"""

import dataclasses
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from dpjax import errors
from dpjax import privacy
from dpjax.data import splits
from dpjax.data import transforms as transforms_lib
from dpjax.train import task as task_lib

_SCORE_TAG = 0x0A0D17  # rng stream of the scoring transforms.


@dataclasses.dataclass(frozen=True)
class Inserted:
  """The canaries of a run: all m records, which were inserted, and the
  canary phase's source with them appended (each one privacy unit)."""
  phase_index: int
  records: list[dict]
  included: np.ndarray  # bool[m]
  source: Any

  @property
  def num_inserted(self) -> int:
    return int(self.included.sum())


def _fail(field: str, value, fix: str):
  raise errors.config_error(field, value, fix)


def insert(config: ml_collections.ConfigDict,
           phases: list[task_lib.Phase]) -> Inserted | None:
  """The canary phase's source with the included canaries appended.

  Deterministic in (config.audit.num_canaries, config.audit.seed), so a
  resumed run rebuilds the same dataset. The phases are not changed:
  `train.phase_plan.resolve_phases` reads the new source and N from the
  result (the canaries change N and q = B/N).

  Returns:
    None when config.audit.num_canaries == 0.
  """
  a = config.get("audit")
  if a is None or a.num_canaries <= 0:
    return None
  m = int(a.num_canaries)
  hooks = [i for i, p in enumerate(phases) if p.canaries is not None]
  if not hooks:
    _fail("audit.num_canaries", m,
          f"recipe {config.recipe!r} defines no input canaries; set 0")
  index = hooks[-1]
  phase = phases[index]
  if phase.append_canaries is None and phase.num_examples != len(
      phase.source):
    raise ValueError(f"phase {phase.name}: num_examples={phase.num_examples}"
                     f" != len(source)={len(phase.source)}; cannot append "
                     "canaries")
  for f in a.guess_fractions:
    if not 0 < f <= 0.5:
      _fail("audit.guess_fractions", tuple(a.guess_fractions),
            "each fraction must be in (0, 0.5]")
  records = list(phase.canaries(m, int(a.seed)))
  if len(records) != m:
    raise ValueError(f"phase {phase.name}: canaries({m}) returned "
                     f"{len(records)} records")
  included = privacy.audit.choose_included(m, int(a.seed))
  chosen = [r for r, inc in zip(records, included) if inc]
  append = phase.append_canaries or splits.Appended
  return Inserted(index, records, included, append(phase.source, chosen))


def audit(inserted: Inserted, phase: task_lib.Phase, params, *,
          config: ml_collections.ConfigDict, delta: float,
          epsilon: float | None) -> tuple[privacy.audit.AuditResult, dict]:
  """Scores every canary under `params` and runs the one-run audit.

  Args:
    inserted: what `insert` returned.
    phase: the phase the canaries were inserted into.
    params: final parameters.
    config: the run config (reads config.audit).
    delta: delta of the bound (config.audit.delta).
    epsilon: the accountant's epsilon at that delta, reported beside the
      bound (inf for a run without DP).

  Returns:
    The audit result and the mean score of inserted and left-out canaries
    (minus the loss by default; aggregates over canaries, which are not
    private data).
  """
  a = config.audit
  m = len(inserted.records)
  if phase.canary_scores is not None:
    scores = np.asarray(phase.canary_scores(params, inserted.records),
                        np.float64)
  else:
    examples = [transforms_lib.apply(
        phase.transforms, dict(r),
        transforms_lib.example_generator(int(a.seed), 0, i, tag=_SCORE_TAG))
                for i, r in enumerate(inserted.records)]
    batch = jax.tree.map(lambda *xs: np.stack(xs), *examples)
    # The per-example key the pipeline adds (e.g. ViP's MAE mask).
    batch["rng"] = transforms_lib.example_keys(int(a.seed) + _SCORE_TAG, 0,
                                               np.arange(m))
    scores = -np.asarray(jax.lax.map(lambda ex: phase.loss_fn(params, ex),
                                     batch, batch_size=64), np.float64)
  if scores.shape != (m,):
    raise ValueError(f"phase {phase.name}: canary scores of shape "
                     f"{scores.shape}, want ({m},)")
  ks = sorted({max(1, int(f * m)) for f in a.guess_fractions})
  result = privacy.audit.one_run_audit(
      scores, inserted.included, ks, ks, delta, float(a.confidence),
      theoretical_epsilon=epsilon)
  inc = inserted.included
  mean = lambda x: float(x.mean()) if x.size else float("nan")
  means = {"mean_score_inserted": mean(scores[inc]),
           "mean_score_left_out": mean(scores[~inc])}
  return result, means


def write(workdir: str, result: privacy.audit.AuditResult,
          means: dict) -> None:
  """Writes <workdir>/audit.json (aggregates only, no per-canary scores)."""
  (epath.Path(workdir) / "audit.json").write_text(
      json.dumps({**result.to_dict(), **means}, indent=1, default=float))


def metrics(result: privacy.audit.AuditResult, means: dict) -> dict:
  """The audit's entries of results.json."""
  out = {"audit/empirical_epsilon": result.empirical_epsilon,
         "audit/confidence": result.confidence}
  out.update({f"audit/{k}": v for k, v in result.counts.items()})
  out.update({f"audit/{k}": v for k, v in means.items()})
  return out


def audit_run(run, params, workdir: str) -> dict:
  """config.audit at the end of the loop's run `run`: scores the canaries,
  writes audit.json (process 0), logs the bound; returns its metrics."""
  phase = run.plans[run.canaries.phase_index]
  private = run.dp is not None and phase.private
  delta = run.config.audit.delta
  result, means = audit(
      run.canaries, phase.phase, params, config=run.config, delta=delta,
      epsilon=run.ledger.epsilon(delta) if private else float("inf"))
  logging.info("audit: empirical epsilon >= %.3f at %.0f%% confidence from "
               "%d canaries (accountant epsilon %.4g at delta %.3g)",
               result.empirical_epsilon, 100 * result.confidence,
               len(run.canaries.records), result.theoretical_epsilon,
               result.delta)
  if jax.process_index() == 0:
    write(workdir, result, means)
  return metrics(result, means)
