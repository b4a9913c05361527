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
from dpjax import private_files
from dpjax.data import bad_records
from dpjax.data import pipeline
from dpjax.train import canaries as canaries_lib
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import ema as ema_lib
from dpjax.train import mesh as mesh_lib
from dpjax.train import metrics as metrics_lib
from dpjax.train import preemption as preemption_lib
from dpjax.train import secrets
from dpjax.train import settings as settings_lib
from dpjax.train import state as state_lib
from dpjax.train import step as step_lib
from dpjax.train import task as task_lib


class _Run:
  """State of one `run` call: config, task, mesh, ledger, writers."""

  def __init__(self, task: task_lib.Task, config, workdir: str):
    self.config, self.workdir, self.task = config, workdir, task
    self.mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    settings_lib.validate_train(config.train, jax.device_count())
    # Inserted canaries are part of N: the plans read their source.
    self.canaries = canaries_lib.insert(config, list(task.phases))
    self.plans = settings_lib.resolve_phases(config, task.phases,
                                             self.canaries)
    # Small sources are read in full now: bad records fail the run before
    # it starts (or, with data.on_bad_record=skip, become zero rows).
    self.startup_bad = {} if config.eval_only else bad_records.validate_phases(
        [(p.name, p.source, p.transforms) for p in self.plans],
        on_bad_record=config.data.on_bad_record,
        max_records=config.data.validate_max_records)
    # Bad records met in training: in memory and in the checkpoint, never
    # logged per step (that would say when they were drawn); written once
    # at the end (_write_bad_records).
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

  def epsilon(self) -> float:
    return self.ledger.epsilon() if self.ledger.steps else 0.0

  @property
  def is_simulation(self) -> bool:
    return self.dp is not None and self.dp.is_simulation

  def progress_epsilon(self) -> tuple[str, float]:
    """What the logs track: ("epsilon", the ledger's), or for a TAN
    simulation ("tan_reference_epsilon", that of the simulated reference run
    (B, sigma) after as many steps). A simulation's own epsilon (hundreds) is
    meaningless, and PLD at its tiny sigma costs tens of seconds, so it is
    computed once, at the end."""
    if not self.is_simulation:
      return "epsilon", self.epsilon()
    if not self.ledger.steps:
      return "tan_reference_epsilon", 0.0
    ref_q = min(1.0, self.dp.tan_reference_batch_size /
                self.ledger.num_examples)
    return "tan_reference_epsilon", privacy.epsilon(
        self.dp.tan_reference_noise_multiplier, ref_q, self.ledger.steps,
        self.dp.delta, accountant=self.dp.accountant)

  def describe(self) -> dict:
    """Public facts of the run for logs and results.json."""
    out = dict(recipe=self.config.recipe, total_steps=self.total_steps)
    for phase in self.plans:
      out.update(phase.describe())
    if self.dp:
      p = self.config.privacy
      out.update(
          # False: a seed in the config fixed the noise or the batch
          # selection, so the epsilon below is NOT a guarantee.
          secret_randomness=p.noise_seed < 0 and p.sampling_seed < 0,
          secret_noise=p.noise_seed < 0, secret_sampling=p.sampling_seed < 0,
          delta_rule=self.dp.delta_rule)
      out.update(delta=self.dp.delta, accountant=self.dp.accountant,
                 mechanism=next(p for p in self.plans
                                if p.private).mechanism,
                 bands=self.dp.bands,
                 target_epsilon=self.dp.target_epsilon,
                 tan_simulation=self.dp.is_simulation)
      if self.dp.is_simulation:
        out.update(
            tan_reference_batch_size=self.dp.tan_reference_batch_size,
            tan_reference_noise_multiplier=
            self.dp.tan_reference_noise_multiplier)
    return out


def _allowed_steps(run: _Run, phase: settings_lib.PhasePlan,
                   done: int) -> int:
  """Steps of `phase` that keep the ledger within the target epsilon."""
  remaining = phase.steps - done
  if not phase.private or remaining <= 0 or run.dp.is_simulation:
    return remaining
  target = phase.privacy.target_epsilon

  def eps(t):
    ledger = run.ledger.copy()
    phase.record(ledger, done, t)
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
  if phase.make_batches is not None:
    iterator = phase.make_batches(**kwargs)
  else:
    iterator = iter(pipeline.PoissonBatches(
        transforms=phase.transforms, num_examples=phase.num_examples,
        bands=phase.bands, **kwargs))
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
      phase.record(run.ledger, phase_step - 1, 1)
    gstep = int(state.step)
    last = phase_step == end
    if gstep % config.train.log_every == 0 or last:
      m = {prefix + k: float(v) for k, v in jax.device_get(metrics).items()}
      # From the EXPECTED batch q*N: the realised Poisson size (and
      # anything derived from it) never leaves the step.
      m["examples_per_sec"] = (since * phase.batch_size /
                               max(time.time() - t0, 1e-9))
      eps_key, m_eps = run.progress_epsilon()
      m[eps_key] = m_eps
      if phase.monitor is not None:
        m.update(phase.monitor(state.params, gstep))
      writer.write(gstep, m)
      writer.progress(gstep, {prefix + "loss": m[prefix + "loss"],
                              "ref_eps" if run.is_simulation else "eps": m_eps,
                              "ex/s": m["examples_per_sec"]})
      t0, since = time.time(), 0
    if not (last and (stopped or index == len(run.task.phases) - 1)):
      t_eval = time.time()
      _evaluate(run, state, writer, gstep, periodic=True)  # End: all.
      t0 += time.time() - t_eval  # Throughput counts training time only.
    meta = lambda: dict(phase=index, phase_step=phase_step,
                        noise=phase.noise_signature(),
                        ledger=run.ledger.to_dict(),
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
  """Runs the task's evaluators (held-out PUBLIC data; they read params
  only, so training and its randomness are unchanged) and logs them under
  "eval/" (and, with train.ema_decay, on the EMA params under "eval_ema/"):
  every one at the end, only the due ones with `periodic`."""
  out = {}
  ema = ema_lib.ema_of(state.opt_state)
  versions = [("eval", state.params)] + (
      [("eval_ema", ema)] if ema is not None else [])
  for name, evaluator in run.task.evaluators.items():
    if periodic and not evaluator.due(step):
      continue
    for prefix, params in versions:
      t0 = time.time()
      res = evaluator.run(params)
      out.update({f"{prefix}/{k}": float(v) for k, v in res.items()})
      logging.info("%s %s (%.1fs): %s", prefix, name, time.time() - t0, res)
  if out:
    writer.write(step, out)
  return out


def _audit(run: _Run, params, workdir: str) -> dict:
  """config.audit: scores the canaries, writes audit.json, logs the bound."""
  phase = run.plans[run.canaries.phase_index]
  private = run.dp is not None and phase.private
  delta = run.config.audit.delta
  result, means = canaries_lib.audit(
      run.canaries, phase, params, config=run.config, delta=delta,
      epsilon=run.ledger.epsilon(delta) if private else float("inf"))
  logging.info("audit: empirical epsilon >= %.3f at %.0f%% confidence from "
               "%d canaries (accountant epsilon %.4g at delta %.3g)",
               result.empirical_epsilon, 100 * result.confidence,
               len(run.canaries.records), result.theoretical_epsilon,
               result.delta)
  if jax.process_index() == 0:
    canaries_lib.write(workdir, result, means)
  return canaries_lib.metrics(result, means)


def _write_bad_records(run: _Run, workdir: str, writer, step: int) -> None:
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
  report = bad.report([(p.name, p.private, p.source) for p in run.plans],
                      run.startup_bad)
  private_files.write_private_text(
      workdir.rstrip("/") + "/" + bad_records.BAD_RECORDS_FILE,
      json.dumps(report, indent=1))
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
    if rmeta["phase"] > 0:  # The saved optimizer state is that phase's.
      state = state._replace(opt_state=state_lib.init_opt(
          phases[rmeta["phase"]], state.params, r.mesh,
          state_lib.noise_key(config, r.mesh, secret=False), 0))
    restored, meta = r.ckpt.restore(ckpt_lib.abstract_like(state._asdict()))
    state = step_lib.TrainState(**restored)
    saved = privacy.PrivacyLedger.from_dict(meta["ledger"])
    if jax.process_index() == 0:  # The saved tally is all processes' sum.
      r.bad = bad_records.BadRecordTally.from_state(meta.get("bad_records"))
    if saved.steps:  # Else (saved in a public phase) keep this run's N, delta.
      r.ledger = saved
    logging.info("resumed at step %d (phase %s, epsilon %.4g)",
                 int(state.step), phases[meta["phase"]].name, r.epsilon())
  logging.vlog(1, "run: %s", json.dumps(r.describe(), indent=1))
  logging.info("%s: %d steps (%s) in %s", config.recipe, r.total_steps,
               ", ".join(f"{p.name}: {'DP' if p.private else 'public'}"
                         for p in r.plans), workdir)
  if r.dp is not None:
    for name in ("noise_seed", "sampling_seed"):
      if config.privacy[name] >= 0:
        logging.warning(
            "config.privacy.%s=%d: this run's %s randomness is NOT secret, "
            "so its epsilon is not a guarantee (tests and reproducible "
            "experiments only; leave it at -1 for real runs).", name,
            config.privacy[name], name.split("_")[0])
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
        state, done, stopped = _train_phase(
            r, i, state, meta["phase_step"] if first else 0,
            meta["data"] if first else None, preempt, writer)
        if stopped:
          break
    r.ckpt.wait()
    if stopped and preempt.requested:
      writer.close()
      return dict(preempted=True, step=int(state.step))
    if not config.eval_only:
      _write_bad_records(r, workdir, writer, int(state.step))
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
    results.update(_audit(r, state.params, workdir))
  samples = (r.task.summary(state.params)
             if r.task.summary is not None and jax.process_index() == 0
             else None)
  with preempt.critical():  # results.json last: it marks the run as ended.
    if jax.process_index() == 0:  # epath: local or bucket (gs://) workdirs.
      out = epath.Path(workdir)
      if samples is not None:
        (out / "samples.json").write_text(json.dumps(samples, indent=1))
      (out / "results.json").write_text(
          json.dumps(results, indent=1, default=float))
    writer.close()
    r.ckpt.close()
  label = " (TAN SIMULATION: not an epsilon run)" if (
      r.dp and r.dp.is_simulation) else ""
  logging.info("done: step %d, epsilon %.4g (delta %.3g)%s; results in "
               "%s/results.json", results["step"], results["epsilon"],
               r.dp.delta if r.dp else 0, label, workdir)
  return results
