"""DP continual pretraining (Bu et al. 2024): public AdamW, then DP-AdamW.

Glue only. A supervised ViT classifier (`models/classifier.py`) with a
per-example softmax cross-entropy is trained in up to two phases:
  "public": non-private AdamW on the public share (of `data.source`, each
    record's share decided by a keyed hash of that record and the public
    `data.split_seed`, `data/splits.py`; or a second source); spends no
    privacy and records nothing in the ledger.
  "dp": the loop's DP step (Poisson sampling over the PRIVATE view only,
    per-example automatic clipping, one Gaussian draw) followed by AdamW,
    i.e. DP-AdamW. On entering it the AdamW state is carried over per
    `config.switch.reset` (`reset_opt_state`).
`config.arm` selects the arm of the paper's comparison at equal total steps
(and equal epsilon for the private arms). Diagnostics (`Monitor`):
held-out loss decrease per step and a Hutchinson tr(H) estimate. Evaluation
functions (config.evals): "logits" (classifier-head accuracy on held-out
data) and "features" (linear probe, non-private full fine-tuning) on the
downstream probe data.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import evaluate
from dpjax.data import arrays
from dpjax.data import sources
from dpjax.data import splits
from dpjax.data import synthetic
from dpjax.data import transforms as transforms_lib
from dpjax.errors import ConfigError
from dpjax.models import classifier
from dpjax.train import optim
from dpjax.train import task as task_lib

ARMS = ("continual", "private_only", "public_only", "nonprivate")
RESETS = ("m", "none", "both", "v")
_ENCODER_OVERRIDES = ("width", "depth", "num_heads", "mlp_dim", "patch_size")


def build_model(config: ml_collections.ConfigDict) -> classifier.Classifier:
  """The classifier of `config.model` with `data.num_classes` outputs."""
  m = config.model
  cfg = classifier.classifier_config(m.variant, config.data.num_classes,
                                     pooling=m.pooling)
  cfg["encoder"].update({k: m[k] for k in _ENCODER_OVERRIDES if m[k]})
  dtype = jnp.bfloat16 if config.train.dtype == "bfloat16" else jnp.float32
  return classifier.Classifier(**cfg, dtype=dtype)


def make_loss_fn(model: classifier.Classifier) -> Callable[..., jax.Array]:
  """Per-example loss(params, {"image": [S,S,3], "label": int}) -> CE."""
  def loss_fn(params, example):
    logits = model.apply({"params": params}, example["image"][None])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, example["label"][None].astype(jnp.int32))[0]
  return loss_fn


def _source(config, spec: str, *, split: str, num_examples: int,
            seed: int, data_dir: str = "", num_examples_field: str = ""):
  """A labelled image source (records with "image" and "label")."""
  d = config.data
  return sources.from_config(
      spec, split=split, seed=seed, num_examples=num_examples,
      image_size=d.image_size, data_dir=data_dir,
      fields={"image": d.image_key, "label": d.label_key},
      num_examples_field=num_examples_field)


def public_private_sources(config: ml_collections.ConfigDict
                           ) -> tuple[Any, Any]:
  """(public source, private source); disjoint when split from one source.

  With `public.source` empty, `data.source` is split record by record
  (`splits.public_private_split`: public iff a keyed hash of the record and
  `data.split_seed` falls below `data.public_fraction`, so one record added
  or removed moves no other) into two index-remapped views: the private one
  covers ONLY private records, so a sampler over [0, len(private)) can never
  reach a public example, and N_priv = len(private) is the accountant's N.
  """
  d, p = config.data, config.public
  full = _source(config, d.source, split=d.split,
                 num_examples=d.num_examples, seed=config.seed,
                 data_dir=d.data_dir,
                 num_examples_field="config.data.num_examples")
  if not p.source:
    return splits.public_private_split(full, d.public_fraction, d.split_seed)
  pub = _source(config, p.source, split=p.split,
                num_examples=p.num_examples, seed=config.seed + 1,
                data_dir=p.data_dir)
  return pub, full


class _Concat:
  """Two sources end to end (the no-DP reference arm trains on both)."""

  def __init__(self, a, b):
    self.a, self.b = a, b

  def __len__(self) -> int:
    return len(self.a) + len(self.b)

  def __getitem__(self, i: int):
    i = int(i)
    return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]


def _swap_adam(old, new, mode: str):
  """Merges two AdamW states of one structure per `mode` (see RESETS)."""
  found = []

  def walk(o, n):
    if isinstance(n, optax.ScaleByAdamState):
      if not isinstance(o, optax.ScaleByAdamState):
        raise ConfigError("config.switch.reset: the public phase has no Adam "
                          "state at this position; use train.optimizer="
                          "public.optimizer='adamw' or switch.reset='both'")
      found.append(True)
      if mode == "m":
        return optax.ScaleByAdamState(count=o.count, mu=n.mu, nu=o.nu)
      if mode == "v":
        return optax.ScaleByAdamState(count=o.count, mu=o.mu, nu=n.nu)
      return o  # "none".
    if isinstance(n, tuple) and type(o) is type(n) and len(o) == len(n):
      kids = [walk(a, b) for a, b in zip(o, n)]
      return type(n)(*kids) if hasattr(n, "_fields") else type(n)(kids)
    return n  # e.g. the learning-rate schedule count: the new phase's.

  out = walk(old, new)
  if not found:
    raise ConfigError(f"config.switch.reset={mode!r} needs AdamW in both "
                      "phases (public.optimizer = train.optimizer = 'adamw');"
                      " or use switch.reset='both'")
  return out


def reset_fn(mode: str):
  """Phase.reset_opt_state for the public -> DP switch.

  "m" (Bu et al.): first moment re-initialised, second moment and Adam's
  step count (bias correction) kept; "none": all Adam state kept; "v":
  second moment re-initialised; "both": the fresh state. The learning-rate
  schedule always restarts with the DP phase's own schedule.
  """
  if mode not in RESETS:
    raise ConfigError(f"config.switch.reset={mode!r} is invalid: use one of "
                      f"{RESETS}")
  if mode == "both":
    return None
  return lambda old, new: _swap_adam(old, new, mode)


def _check_horizon(block, name: str, steps: int):
  if block.warmup_steps >= (block.decay_steps or steps):
    raise ValueError(
        f"config.{name}.warmup_steps={block.warmup_steps} is invalid: must "
        f"be < the cosine horizon {block.decay_steps or steps}")


def phases_for_arm(config, pub_src, priv_src, loss_fn, transforms,
                   monitor) -> list[task_lib.Phase]:
  """The phases of `config.arm`, all with public.steps + train.steps steps."""
  p, t, arm = config.public, config.train, config.arm
  if arm not in ARMS:
    raise ConfigError(f"config.arm={arm!r} is invalid: use one of {ARMS}")
  total = p.steps + t.steps

  def public(steps, src, name="public"):
    _check_horizon(p, "public", steps)
    return task_lib.Phase(
        name=name, private=False, source=src, transforms=transforms,
        loss_fn=loss_fn, steps=steps, batch_size=p.batch_size,
        optimizer=optim.optimizer_from_config(p, steps), monitor=monitor)

  def private(steps, reset=None):
    _check_horizon(t, "train", steps)
    on = config.privacy.enabled
    return task_lib.Phase(
        name="dp" if on else "train", private=on, source=priv_src,
        transforms=transforms, loss_fn=loss_fn, steps=steps,
        batch_size=t.batch_size,
        optimizer=optim.optimizer_from_config(t, steps),
        reset_opt_state=reset, num_examples=len(priv_src), monitor=monitor,
        canaries=lambda m, seed: synthetic.noise_canaries(
            m, seed, config.data.image_size,
            num_classes=config.data.num_classes))

  if arm == "public_only":
    return [public(total, pub_src)]
  if arm == "private_only":
    return [private(total)]
  if arm == "nonprivate":
    return [public(total, _Concat(pub_src, priv_src), name="nonprivate")]
  phases = [public(p.steps, pub_src)] if p.steps > 0 else []
  if t.steps > 0:
    phases.append(private(t.steps, reset_fn(config.switch.reset)))
  if not phases:
    raise ConfigError("config.public.steps = config.train.steps = 0: nothing "
                      "to train")
  return phases


def eval_arrays(spec: str, config, *, split: str, num: int,
                labels: tuple[str, ...] = ("label",), data_dir: str = ""
                ) -> dict[str, np.ndarray]:
  """Held-out PUBLIC images float32[num, S, S, 3] + int label fields [num]."""
  d = config.data
  src = _source(config, spec, split=split, num_examples=num,
                seed=config.seed, data_dir=data_dir)
  ts = transforms_lib.image_pipeline(d.image_size, keep=("image",) + labels)
  return arrays.materialise(src, ts, range(min(num, len(src))),
                            keep=("image",) + labels)


class Monitor:
  """Phase.monitor: training diagnostics on a fixed held-out PUBLIC batch.

  At each log step: "monitor/heldout_loss"; "monitor/loss_drop_per_step",
  the held-out loss decrease since the previous log step divided by the
  steps in between (the per-iteration loss improvement Bu et al. analyse;
  exact per step with train.log_every=1); every `trace_every` steps
  "monitor/hessian_trace", a Hutchinson estimate of tr(H) of the mean
  held-out loss: mean over Rademacher probes v of v^T H v, with H v by
  forward-over-reverse differentiation (jax.jvp of jax.grad). Uses no
  private data, so its values are public.
  """

  def __init__(self, loss_fn, held: dict[str, np.ndarray], *, probes: int,
               trace_every: int, seed: int = 0):
    self.batch = {"image": jnp.asarray(held["image"]),
                  "label": jnp.asarray(held["label"])}
    self.probes, self.trace_every = probes, trace_every
    self.key = jax.random.PRNGKey(seed + 0x7A11)
    self._prev, self._last_trace = None, None

    def mean_loss(params, batch):
      return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))

    def trace(params, batch, key):
      grad = lambda p: jax.grad(mean_loss)(p, batch)
      leaves, treedef = jax.tree.flatten(params)

      def one(k):
        ks = jax.random.split(k, len(leaves))
        v = [jax.random.rademacher(kk, x.shape, jnp.float32)
             for kk, x in zip(ks, leaves)]
        _, hv = jax.jvp(grad, (params,), (treedef.unflatten(v),))
        return sum(jnp.vdot(a, b.astype(jnp.float32))
                   for a, b in zip(v, jax.tree.leaves(hv)))

      return jnp.mean(jax.lax.map(one, jax.random.split(key, probes)))

    self._loss = jax.jit(mean_loss)
    self._trace = jax.jit(trace)

  def hessian_trace(self, params, step: int) -> float:
    """Hutchinson tr(H) estimate with probes keyed by `step`."""
    key = jax.random.fold_in(self.key, step)
    return float(self._trace(params, self.batch, key))

  def __call__(self, params, step: int) -> dict[str, float]:
    loss = float(self._loss(params, self.batch))
    out = {"monitor/heldout_loss": loss}
    if self._prev is not None and step > self._prev[0]:
      out["monitor/loss_drop_per_step"] = (
          (self._prev[1] - loss) / (step - self._prev[0]))
    self._prev = (step, loss)
    if self.trace_every > 0 and (
        self._last_trace is None
        or step // self.trace_every > self._last_trace // self.trace_every):
      out["monitor/hessian_trace"] = self.hessian_trace(params, step)
      self._last_trace = step
    return out


def build(config: ml_collections.ConfigDict) -> task_lib.Task:
  """The DP continual pretraining task for `train.loop.run`."""
  d, mon = config.data, config.monitor
  model = build_model(config)
  loss_fn = make_loss_fn(model)
  pub_src, priv_src = public_private_sources(config)
  transforms = transforms_lib.image_pipeline(
      d.image_size, augment=d.augment, flip=d.flip, keep=("image", "label"))
  monitor = None
  if mon.enabled:
    held = eval_arrays(d.eval_source, config, split=mon.split,
                       num=mon.num_examples)
    monitor = Monitor(
        loss_fn, held, probes=mon.probes, trace_every=mon.trace_every,
        seed=config.seed)
  phases = phases_for_arm(config, pub_src, priv_src, loss_fn, transforms,
                          monitor)

  def init_params(rng):
    images = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32)
    return model.init(rng, images)["params"]

  logits = lambda params, x: model.apply({"params": params}, x)
  features = lambda params, x: model.apply(
      {"params": params}, x, method=classifier.Classifier.features)
  labels = tuple(k.strip() for k in d.probe_labels.split(",") if k.strip())
  probe = lambda split, num: eval_arrays(
      d.probe_source, config, split=split, num=num, labels=labels,
      data_dir=d.probe_data_dir)
  context = evaluate.Context("dp_continual", fns=dict(
      logits=logits, features=features), data=dict(
          test=lambda: eval_arrays(d.eval_source, config, split=d.eval_split,
                                   num=d.eval_num_examples),
          probe_train=lambda: probe(d.probe_train_split,
                                    d.probe_train_examples),
          probe_test=lambda: probe(d.probe_test_split,
                                   d.probe_test_examples)))
  return task_lib.Task(init_params=init_params, phases=phases,
                       evaluators=evaluate.from_config(config.evals, context))
