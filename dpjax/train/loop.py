"""`run(task, config, workdir)`: the one training loop every recipe plugs into.

build task -> resolve privacy -> init or resume -> for each phase: Poisson
batches -> microbatch accumulation of clipped sums -> one noisy update per
step -> ledger, logs, checkpoints -> evaluate -> results.json. Notebooks,
tests and launch scripts reach it through `dpjax.recipes.run`, which builds
the recipe's task; the loop never imports a recipe.
"""

import functools
import json
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from dpjax import privacy
from dpjax.data import bad_records
from dpjax.data import pipeline
from dpjax.train import as_run as as_run_lib
from dpjax.train import canaries as canaries_lib
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import ema as ema_lib
from dpjax.train import mesh as mesh_lib
from dpjax.train import metrics as metrics_lib
from dpjax.train import preemption as preemption_lib
from dpjax.train import publish
from dpjax.train import report
from dpjax.train import secrets
from dpjax.train import optim
from dpjax.train import phase_plan
from dpjax.train import state as state_lib
from dpjax.train import step as step_lib
from dpjax.train import task as task_lib


class _Run:
  """State of one `run` call: config, task, mesh, ledger, writers."""

  def __init__(self, task: task_lib.Task, config, workdir: str):
    self.config, self.workdir, self.task = config, workdir, task
    self.mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    optim.validate_train(config.train, jax.device_count())
    # Inserted canaries are part of N: the plans read their source.
    self.canaries = canaries_lib.insert(config, list(task.phases))
    self.plans = phase_plan.resolve_phases(config, task.phases,
                                           self.canaries)
    # Small sources are read in full now: bad records fail the run before
    # it starts (or, with data.on_bad_record=skip, become zero rows).
    self.startup_bad = {} if config.eval_only else bad_records.validate_phases(
        [(p.name, p.source, p.phase.transforms) for p in self.plans],
        on_bad_record=config.data.on_bad_record,
        max_records=config.data.validate_max_records)
    # Bad records met in training: in memory and in the checkpoint, never
    # logged per step (that would say when they were drawn); written once
    # at the end (report.write_bad_records).
    self.bad = bad_records.BadRecordTally()
    private = [p for p in self.plans if p.private]
    self.dp = private[0].privacy if private else None
    self.ledger = privacy.PrivacyLedger(
        num_examples=private[0].num_examples if private else 1,
        delta=self.dp.delta if self.dp else None,
        accountant=self.dp.accountant if self.dp else "pld")
    self.ckpt = ckpt_lib.Checkpointer(workdir,
                                      keep=config.train.keep_checkpoints)
    self.total_steps = sum(p.steps for p in self.task.phases)
    # What ran (replaced by the checkpoint's on resume; as_run.py).
    self.as_run = as_run_lib.AsRun(config.privacy.sampling_seed < 0)

  @property
  def private(self) -> bool:
    """Whether any phase is private (else there is no epsilon)."""
    return self.dp is not None

  def epsilon(self) -> float | None:
    """The ledger's epsilon at its delta (the printed one); None for a
    non-private run: it has no guarantee (never 0)."""
    if not self.private:
      return None
    return self.ledger.epsilon() if self.ledger.steps else 0.0

  @property
  def is_simulation(self) -> bool:
    return self.dp is not None and self.dp.is_simulation

  # What the logs and results.json say (report.py).
  epsilon_text = report.epsilon_text
  progress_epsilon = report.progress_epsilon
  describe = report.describe


def _allowed_steps(run: _Run, phase: phase_plan.PhasePlan,
                   done: int) -> int:
  """Steps of `phase` that keep the ledger within the target epsilon."""
  remaining = phase.steps - done
  if not phase.private or remaining <= 0 or run.dp.is_simulation:
    return remaining
  target = phase.privacy.target_epsilon

  def eps(t):
    ledger = run.ledger.copy()
    phase.mechanism.record(ledger, done, t)
    return ledger.epsilon()
  if eps(remaining) <= target:
    return remaining
  lo, hi = 0, remaining  # eps(lo) <= target < eps(hi).
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if eps(mid) <= target else (lo, mid)
  logging.warning("%s: stopping after %d of %d remaining steps: one more "
                  "would exceed target epsilon %.3g", phase.name, lo,
                  remaining, target)
  return lo


def _train_phase(run: _Run, index: int, state, phase_step: int,
                 data_state, preempt: preemption_lib.Preemption, writer):
  """Trains phase `index` from `phase_step`; returns (state, done, stopped)."""
  config, phase = run.config, run.plans[index]
  pshard = jax.tree.map(lambda x: x.sharding, state.params)
  acc_shard = {k: mesh_lib.replicated(run.mesh) for k in step_lib.AUX_KEYS}
  acc_shard["grad"] = pshard
  zeros = jax.jit(step_lib.zeros_accumulator, out_shardings=acc_shard)
  accumulate = jax.jit(functools.partial(step_lib.accumulate, phase.sum_fn),
                       donate_argnums=(1,), out_shardings=acc_shard)
  apply = jax.jit(functools.partial(
      step_lib.apply, optimizer=phase.step_optimizer()), donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda x: x.sharding, state),
                     mesh_lib.replicated(run.mesh)))
  allowed = _allowed_steps(run, phase, phase_step)
  end = phase_step + allowed
  # Private data: the secret sampling key drives batch selection and all
  # per-example randomness. Public phases: config.seed (nothing to hide).
  seed = (secrets.phase_sampling_seed(
      secrets.host_words(state.sampling_key), index) if phase.private
          else config.seed + 1000 * index)
  kwargs = dict(source=phase.source, sampling_rate=phase.sampling_rate,
                seed=seed, start_step=phase_step,
                num_steps=end, global_microbatch=config.train.microbatch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                num_workers=config.train.num_workers)
  if phase.phase.make_batches is not None:
    iterator = phase.phase.make_batches(**kwargs)
  else:
    iterator = iter(pipeline.PoissonBatches(
        transforms=phase.phase.transforms, num_examples=phase.num_examples,
        sampler=phase.sampler, **kwargs))
  if data_state is not None:
    iterator.set_state(data_state)
  # Training-data metrics: "private/" under DP (computed on private data,
  # not themselves DP), "nonprivate/" for phases without DP.
  prefix = "private/" if phase.private else "nonprivate/"
  sharding = mesh_lib.batch_sharding(run.mesh)
  t0, since, stopped = time.time(), 0, allowed < phase.steps - phase_step
  for _ in range(allowed):
    element = next(iterator)
    run.bad.add(phase.name, element)
    acc = zeros(state.params)
    for m in range(element["mask"].shape[0]):
      micro = jax.tree.map(lambda x: x[m], element["example"])
      batch = mesh_lib.to_global_array(micro, run.mesh, sharding.spec)
      mask = mesh_lib.to_global_array(element["mask"][m], run.mesh,
                                      sharding.spec)
      acc = accumulate(state.params, acc, batch, mask)
    state, metrics = apply(state, acc)
    phase_step += 1
    since += 1
    if phase.private:
      phase.mechanism.record(run.ledger, phase_step - 1, 1)
    gstep = int(state.step)
    last = phase_step == end
    if gstep % config.train.log_every == 0 or last:
      m = {prefix + k: float(v) for k, v in jax.device_get(metrics).items()}
      # From the EXPECTED batch q*N: the realised Poisson size (and
      # anything derived from it) never leaves the step.
      m["examples_per_sec"] = (since * phase.batch_size /
                               max(time.time() - t0, 1e-9))
      shown = {prefix + "loss": m[prefix + "loss"]}
      if (tracked := run.progress_epsilon()) is not None:  # Private run.
        m[tracked[0]] = tracked[1]
        shown["ref_eps" if run.is_simulation else "eps"] = tracked[1]
      shown["ex/s"] = m["examples_per_sec"]
      if phase.phase.monitor is not None:
        m.update(phase.phase.monitor(state.params, gstep))
      writer.write(gstep, m)
      writer.progress(gstep, shown)
      t0, since = time.time(), 0
    if not (last and (stopped or index == len(run.task.phases) - 1)):
      t_eval = time.time()
      _evaluate(run, state, writer, gstep, periodic=True)  # End: all.
      t0 += time.time() - t_eval  # Throughput counts training time only.
    meta = lambda: dict(phase=index, phase_step=phase_step,
                        noise=phase.noise_signature(),
                        ledger=run.ledger.to_dict(),
                        as_run=run.as_run.to_dict(index, phase_step),
                        data=iterator.get_state(),
                        bad_records=run.bad.allgather(
                            [p.name for p in run.task.phases]).state())
    if preempt.agreed():
      run.ckpt.save(gstep, state._asdict(), meta(), force=True)
      run.ckpt.wait()
      return state, phase_step, True
    if gstep % config.train.checkpoint_every == 0 or last:
      run.ckpt.save(gstep, state._asdict(), meta())
  return state, phase_step, stopped


def _evaluate(run: _Run, state, writer, step: int,
              periodic: bool = False) -> dict:
  """Runs the task's evaluators (they read params only, so training and
  its randomness are unchanged) and logs them under "eval/" (held-out
  PUBLIC data; also in export/metrics.json) or, for an evaluator whose data
  derive from the private source (`public` False), "private_eval/" (not DP,
  never exported); with train.ema_decay, on the EMA params too
  ("eval_ema/", "private_eval_ema/"): every one at the end, only the due
  ones with `periodic`."""
  out = {}
  ema = ema_lib.ema_of(state.opt_state)
  versions = [("", state.params)] + (
      [("_ema", ema)] if ema is not None else [])
  for name, evaluator in run.task.evaluators.items():
    if periodic and not evaluator.due(step):
      continue
    base = "eval" if getattr(evaluator, "public", True) else "private_eval"
    for suffix, params in versions:
      t0 = time.time()
      res = evaluator.run(params)
      out.update({f"{base}{suffix}/{k}": float(v) for k, v in res.items()})
      logging.info("%s%s %s (%.1fs): %s", base, suffix, name,
                   time.time() - t0, res)
  if out:
    writer.write(step, out)
    if jax.process_index() == 0:
      publish.add_metrics(run.workdir, step, out)
  return out


def _finished(task: task_lib.Task, workdir: str) -> dict | None:
  """results.json of a run of `task` that already ended (all steps, or
  stopped at its epsilon budget), else None."""
  path = epath.Path(workdir) / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  total = sum(p.steps for p in task.phases)
  if results.get("step") == total or results.get("stopped_at_budget"):
    return results
  return None


def run(task: task_lib.Task, config: ml_collections.ConfigDict,
        workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or only evaluates) `task` as `config` says.

  `task` is the recipe's (`dpjax.recipes.build(config)`; `recipes.run` does
  both): the loop itself knows no recipe. SIGTERM at any moment returns
  {"preempted": True, "step": ...} with a resumable workdir; rerunning
  resumes, and a run that already ended returns its results.json (only what
  is missing, e.g. an interrupted final evaluation, is redone).

  Returns:
    results: the public facts of the run (privacy parameters, final epsilon,
    evaluation metrics), also written to <workdir>/results.json.
  """
  if not config.eval_only:
    done = _finished(task, workdir)
    if done is not None:
      logging.info("%s/results.json: this run already ended (step %d); "
                   "nothing to do", workdir, done["step"])
      return done
  with preemption_lib.Preemption() as preempt:
    try:
      return _run(task, config, workdir, preempt)
    except preemption_lib.Preempted:
      step = ckpt_lib.Checkpointer(workdir).latest_step() or 0
      logging.warning("preempted (last checkpoint: step %d); rerun the same "
                      "command to resume", step)
      return dict(preempted=True, step=step)


def _run(task, config, workdir,
         preempt: preemption_lib.Preemption) -> dict[str, Any]:
  r = _Run(task, config, workdir)
  phases = r.plans
  restoring = r.ckpt.latest_step() is not None
  state = state_lib.init_state(task, r.plans[0], config, r.mesh, restoring)
  meta = dict(phase=0, phase_step=0, ledger=None, data=None)
  if restoring:
    rmeta = r.ckpt.restore_meta()
    phases[rmeta["phase"]].check_resumable(rmeta.get("noise", {}),
                                           rmeta["phase_step"])
    r.as_run = as_run_lib.restore(rmeta, phases)  # Refuses a false report.
    if rmeta["phase"] > 0:  # The saved optimizer state is that phase's.
      state = state._replace(opt_state=state_lib.init_opt(
          phases[rmeta["phase"]], state.params, r.mesh,
          state_lib.noise_key(config, r.mesh, secret=False), 0))
    restored, meta = r.ckpt.restore(ckpt_lib.abstract_like(state._asdict()))
    state = step_lib.TrainState(**restored)
    if jax.process_index() == 0:  # The saved tally is all processes' sum.
      r.bad = bad_records.BadRecordTally.from_state(meta.get("bad_records"))
    r.ledger = as_run_lib.resumed_ledger(meta["ledger"], r.ledger)
    logging.info("resumed at step %d (phase %s, %s)", int(state.step),
                 phases[meta["phase"]].name, r.epsilon_text())
  logging.vlog(1, "run: %s", json.dumps(r.describe(), indent=1))
  logging.info("%s: %d steps (%s) in %s", config.recipe, r.total_steps,
               ", ".join(f"{p.name}: {'DP' if p.private else 'public'}"
                         for p in r.plans), workdir)
  if r.dp is not None:
    for name in as_run_lib.public_keys(r.as_run, phases,
                                       config.privacy.noise_seed):
      logging.warning(
          "this run's %s key is NOT secret (privacy.%s_seed >= 0 in this "
          "config or in the one that started the run), so its epsilon is "
          "not a guarantee (tests and reproducible experiments only; leave "
          "it at -1 for real runs).", name, name)
  writer = metrics_lib.MetricWriter(
      workdir, r.total_steps, int(state.step),
      show_private=config.train.get("progress_private", False))
  stopped = False
  with preempt.critical():  # Steps and checkpoint writes complete.
    if not config.eval_only:
      for i in range(meta["phase"], len(phases)):
        first = i == meta["phase"]
        if not first:  # Entering a new phase: its optimizer.
          state = state_lib.enter_phase(phases[i], state, config, r.mesh)
        if i == len(r.as_run.phases):  # Its noise key: this config's.
          r.as_run.enter(i, phases[i], config.privacy.noise_seed < 0
                         if phases[i].private else None)
        state, done, stopped = _train_phase(
            r, i, state, meta["phase_step"] if first else 0,
            meta["data"] if first else None, preempt, writer)
        r.as_run.advance(i, done)
        if stopped:
          break
    r.ckpt.wait()
    if stopped and preempt.requested:
      writer.close()
      return dict(preempted=True, step=int(state.step))
    if not config.eval_only:
      report.write_bad_records(r, workdir, writer, int(state.step))
    # Params alone, safe to publish; checkpoints/ keeps the secret keys.
    ckpt_lib.export_params(workdir, state.params)
    ema = ema_lib.ema_of(state.opt_state)
    if ema is not None:
      ckpt_lib.export_params(workdir, ema, "ema_params")
  results = r.describe()
  results.update(step=int(state.step), epsilon=r.epsilon(),
                 stopped_at_budget=stopped)
  results.update(_evaluate(r, state, writer, int(state.step)))
  if r.canaries is not None:
    results.update(canaries_lib.audit_run(r, state.params, workdir))
  samples = (r.task.summary(state.params)
             if r.task.summary is not None and jax.process_index() == 0
             else None)
  with preempt.critical():  # results.json last: it marks the run as ended.
    if jax.process_index() == 0:  # epath: local or bucket (gs://) workdirs.
      out = epath.Path(workdir)
      if samples is not None:  # Of public held-out images: exported too.
        (out / "samples.json").write_text(json.dumps(samples, indent=1))
        publish.write_json(workdir, "samples.json", samples)
      publish.write_results(workdir, results)  # The public copy.
      (out / "results.json").write_text(
          json.dumps(results, indent=1, default=float))
    writer.close()
    r.ckpt.close()
  label = " (TAN SIMULATION: not an epsilon run)" if (
      r.dp and r.dp.is_simulation) else ""
  logging.info("done: step %d, %s%s; results in %s/results.json (what "
               "may be published: %s/export/)", results["step"],
               r.epsilon_text(), label, workdir, workdir)
  return results
