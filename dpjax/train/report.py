"""What a run says about itself: its public facts and its epsilon.

Functions of the loop's `_Run` (its plans, ledger, privacy settings and
`as_run` record), used as its methods. Every fact describes what RAN
(`as_run.py`): a resumed run reports the keys it actually used and each
phase as it ran, and its epsilon is the ledger's at the delta it prints. A
run without a private phase has no epsilon: None in results.json, "n/a" in
the logs, no epsilon in the metrics or progress bar (never 0, which would
read as perfect privacy).
"""

import json

from absl import logging
import jax

from dpjax import privacy
from dpjax import private_files
from dpjax.data import bad_records


def epsilon_text(run) -> str:
  """"epsilon E (delta D)" for logs, or "epsilon n/a (non-private)"."""
  if not run.private:
    return "epsilon n/a (non-private)"
  return f"epsilon {run.epsilon():.4g} (delta {run.dp.delta:.3g})"


def progress_epsilon(run) -> tuple[str, float] | None:
  """What the logs track: ("epsilon", the ledger's; None for a non-private
  run: no epsilon to log), or for a TAN simulation ("tan_reference_epsilon", that of the
  simulated reference run (B, sigma) after as many steps). A simulation's
  own epsilon (hundreds) is meaningless, and PLD at its tiny sigma costs
  tens of seconds, so it is computed once, at the end."""
  if not run.private:
    return None
  if not run.is_simulation:
    return "epsilon", run.epsilon()
  if not run.ledger.steps:
    return "tan_reference_epsilon", 0.0
  ref_q = min(1.0, run.dp.tan_reference_batch_size /
              run.ledger.num_examples)
  return "tan_reference_epsilon", privacy.epsilon(
      run.dp.tan_reference_noise_multiplier, ref_q, run.ledger.steps,
      run.dp.delta, accountant=run.dp.accountant)


def describe(run) -> dict:
  """Public facts of the run for logs and results.json: each phase as it
  ran so far, whether the run is private, and for a private run the
  secrecy of the keys actually used and the privacy settings."""
  out = dict(recipe=run.config.recipe, total_steps=run.total_steps,
             private=run.private)
  out.update(run.as_run.describe(run.plans))
  dp = run.dp
  if dp:
    noise, sampling = run.as_run.secret_noise, run.as_run.secret_sampling
    out.update(
        # False: a seed fixed the noise or the batch selection of a key in
        # use (in this config or the one that started the run), so the
        # epsilon is NOT a guarantee.
        secret_randomness=noise and sampling, secret_noise=noise,
        secret_sampling=sampling, delta_rule=dp.delta_rule,
        delta=dp.delta, accountant=dp.accountant,
        **next(p for p in run.plans if p.private).mechanism.settings(),
        target_epsilon=dp.target_epsilon, tan_simulation=dp.is_simulation)
    if dp.is_simulation:
      out.update(
          tan_reference_batch_size=dp.tan_reference_batch_size,
          tan_reference_noise_multiplier=dp.tan_reference_noise_multiplier)
  return out


def write_bad_records(run, workdir: str, writer, step: int) -> None:
  """End of the run, every process: gathers the bad records met in
  training, writes <workdir>/private_bad_records.json (derived from private
  data: owner-only, 0600) and the aggregate private/bad_records
  (nonprivate/ for public phases) to the metrics; this is the only place
  they are reported, and the log line labels them like every private/
  metric."""
  phases = run.task.phases
  bad = run.bad.allgather([p.name for p in phases])
  if jax.process_index() != 0:
    return
  listing = bad.report([(p.name, p.private, p.source) for p in run.plans],
                       run.startup_bad)
  private_files.write_private_text(
      workdir.rstrip("/") + "/" + bad_records.BAD_RECORDS_FILE,
      json.dumps(listing, indent=1))
  m = {}
  for private, prefix in ((True, "private/"), (False, "nonprivate/")):
    names = [p.name for p in phases if p.private == private]
    if names:
      m[prefix + "bad_records"] = bad.num_records(names)
      if bad.num_records(names):
        logging.info(
            "%sbad_records=%d (%d draws)%s; listed in %s", prefix,
            bad.num_records(names), bad.num_draws(names),
            " (computed on private data without noise: NOT differentially "
            "private, not for publication)" if private else "",
            bad_records.BAD_RECORDS_FILE)
  writer.write(step, m)
