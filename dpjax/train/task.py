"""What a recipe hands to the generic loop: phases of training + evaluators.

A recipe (dpjax/recipes/<name>.py) builds a `Task`; `train.loop.run` trains
its phases in order with ONE loop. A phase is private (DP-SGD: per-unit
clipping, one Gaussian draw per step, accounted in the ledger) or non-private
(public data; spends no budget).

Phases are immutable descriptions: what the loop resolves from the config
(sigma, q, N after audit canaries, the clipped-sum function and its
sensitivity) lives in `train.phase_plan.PhasePlan`, never in the phase.
"""

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import optax

Params = Any
Example = Any
# loss_fn(params, example) -> scalar, for ONE example (no batch axis).
LossFn = Callable[[Params, Example], Any]
# clipped_sum_fn(params, batch, mask) -> (sum of clipped per-unit updates,
# aux dict of aggregate scalars: loss_sum, grad_norm_sum, num_clipped, count,
# num_nonfinite). For a private phase a privacy.clipping.BoundedSum, which
# states the L2 sensitivity per privacy unit that the noise is scaled to.
ClippedSumFn = Callable[[Params, Example, Any], tuple[Params, dict]]


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stage of training over one data source.

  Attributes:
    name: used in logs and metric names ("pretrain", "dp", ...).
    private: True for DP-SGD on private data (accounted); False for public.
    source: random-access record source (len + getitem), e.g. a Grain source.
    transforms: Grain transforms (dpjax/data/transforms.py) that turn a
      record into one example's numpy arrays; they run in Grain workers with
      per-example randomness derived from (seed, step, index).
    loss_fn: per-example loss (see LossFn).
    steps: number of logical steps.
    batch_size: EXPECTED logical batch size q*N (Poisson sampling).
    optimizer: optax transformation applied to the privatised mean gradient.
    clipped_sum_fn: overrides per-example clipping of `loss_fn` (DP-FedEmb
      clips per-user model deltas; a `privacy.clipping.BoundedSum` on a
      private phase); None = privacy.clipped_grad(loss_fn) with the
      config's clip norm.
    reset_opt_state: called with (old_opt_state, new_opt_state) on entering
      the phase after an earlier one; returns the state to use (DP continual
      pretraining keeps Adam's second moment). None = fresh optimizer state.
    num_examples: N, the private population size (defaults to len(source)).
    make_batches: overrides the per-example Poisson pipeline (DP-FedEmb
      samples users): called with keyword arguments source (the phase's,
      audit canaries appended), sampling_rate, seed, start_step, num_steps,
      global_microbatch, process_index, process_count, num_workers;
      returns a checkpointable iterator whose elements have
      "example", "mask" [n_micro, M/P] and "batch_size", like
      data.pipeline.PoissonBatches.
    monitor: optional (params, step) -> dict of extra scalars, called at
      every log step (e.g. a Hutchinson estimate of tr(H)); names starting
      with "private/" mark values computed on private data.
    canaries: optional (num, seed) -> `num` audit canary records in this
      phase's record format, from outside the training data (e.g. OOD images
      with random captions, mislabelled held-out images); set by recipes on
      the phase that trains on private data, used when config.audit asks.
    append_canaries: optional (source, included canary records) -> source
      with them appended, each as ONE more privacy unit (DP-FedEmb: one
      canary = one user). None: `data.splits.Appended` (one record = one
      example).
    canary_scores: optional (params, all canary records) -> float[m], higher
      = more likely trained on. None: minus `loss_fn` on each transformed
      record.
  """
  name: str
  private: bool
  source: Any
  transforms: Sequence[Any]
  loss_fn: LossFn
  steps: int
  batch_size: int
  optimizer: optax.GradientTransformation
  clipped_sum_fn: ClippedSumFn | None = None
  reset_opt_state: Callable[[Any, Any], Any] | None = None
  num_examples: int = 0
  make_batches: Callable[..., Any] | None = None
  monitor: Callable[[Params, int], Mapping[str, float]] | None = None
  canaries: Callable[[int, int], list[dict]] | None = None
  append_canaries: Callable[[Any, list[dict]], Any] | None = None
  canary_scores: Callable[[Params, list[dict]], Any] | None = None

  def __post_init__(self):
    if not self.num_examples:
      object.__setattr__(self, "num_examples", len(self.source))


@dataclasses.dataclass
class Task:
  """A recipe's contribution: how to init params, what to train, how to eval.

  Attributes:
    init_params: rng -> params pytree (float32).
    phases: trained in order by the loop.
    evaluators: {name: scheduled evaluator}, as `evaluate.from_config`
      builds them from config.evals and the recipe's functions and data
      (`evaluate.Context`). Each has `log_steps` and `due(step) -> bool`
      (log_steps > 0 divides step) and `run(params) -> {metric: float}` on
      held-out data (built, its data loaded, on first use), and `public`
      (default True): False if its data derive from the private source.
      The loop runs the due ones after a training step and all of them at
      the end, and logs them under "eval/" (public; also exported) or
      "private_eval/" (not DP; never exported).
    summary: optional params -> dict of extra artefacts (e.g. captions) to
      write to the workdir and export/ at the end (public data only).
  """
  init_params: Callable[[Any], Params]
  phases: Sequence[Phase]
  evaluators: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  summary: Callable[[Params], Mapping[str, Any]] | None = None
