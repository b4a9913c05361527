"""ViP recipe (Yu et al. 2024): synthetic warm start, then DP-SGD MAE.

Glue only. The task has up to two phases over one MAE (`models/mae.py`):
  "pretrain": non-private MAE on synthetic images (`synthetic:textures`, a
    Shaders21k stand-in, or real Shaders21k via folder:/tfds:); public data,
    no privacy spent, nothing recorded in the ledger.
  "dp": DP-SGD MAE on the private images (the loop's Poisson sampling,
    per-example clipping and noise). Each example's random mask comes from
    its own `example["rng"]` key, so the per-example loss -- and hence the
    per-example gradient that is clipped -- depends on that example only.
Evaluation functions (config.evals): "features" for linear probes on
frozen features of held-out public labelled images (logistic regression,
or the MAE protocol with pred_kw last_k) and "mae_loss" for the held-out
MAE loss with fixed masks.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpjax import evaluate
from dpjax.data import arrays
from dpjax.data import sources
from dpjax.data import synthetic
from dpjax.data import transforms as transforms_lib
from dpjax.errors import ConfigError
from dpjax.models import mae
from dpjax.train import optim
from dpjax.train import task as task_lib

PHASES = ("pretrain", "dp")
_ENCODER_OVERRIDES = ("width", "depth", "num_heads", "mlp_dim", "patch_size")


def build_model(config: ml_collections.ConfigDict) -> mae.MAE:
  """The MAE described by `config.model` (encoder = `vit.ViT`)."""
  m = config.model
  cfg = mae.mae_config(
      m.variant, decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
      decoder_heads=m.decoder_heads, mask_ratio=m.mask_ratio,
      norm_pix_loss=m.norm_pix_loss)
  cfg["encoder"].update(pos_embedding=m.pos_embedding)
  cfg["encoder"].update({k: m[k] for k in _ENCODER_OVERRIDES if m[k]})
  dtype = jnp.bfloat16 if config.train.dtype == "bfloat16" else jnp.float32
  return mae.MAE(**cfg, dtype=dtype)


def make_loss_fn(model: mae.MAE):
  """Per-example loss(params, example) -> scalar masked-patch MSE.

  `example` = {"image": float32[S, S, 3], "rng": uint32[2]}: the mask is
  drawn from the example's own key, so nothing couples examples.
  """
  def loss_fn(params, example):
    return model.apply({"params": params}, example["image"][None],
                       example["rng"][None], method=mae.MAE.loss)[0]
  return loss_fn


def selected_phases(config: ml_collections.ConfigDict) -> list[str]:
  """Phase names to build, from `config.phases` and `pretrain.steps`."""
  names = [p.strip() for p in config.phases.split(",") if p.strip()]
  if not names or any(n not in PHASES for n in names) or (
      names != [p for p in PHASES if p in names]):
    raise ConfigError(f"config.phases={config.phases!r} is invalid: use "
                      "'pretrain,dp', 'pretrain' or 'dp'")
  if config.pretrain.steps <= 0 and "pretrain" in names:
    names.remove("pretrain")
    if not names:
      raise ConfigError("config.pretrain.steps=0 with config.phases="
                        "'pretrain' leaves nothing to train: set "
                        "pretrain.steps > 0 or add the 'dp' phase")
  return names


def _pretrain_phase(config, loss_fn) -> task_lib.Phase:
  p, d = config.pretrain, config.data
  if p.warmup_steps >= (p.decay_steps or p.steps):
    raise ValueError(
        f"config.pretrain.warmup_steps={p.warmup_steps} is invalid: must be "
        f"< the cosine horizon {p.decay_steps or p.steps} (pretrain.steps or "
        "pretrain.decay_steps)")
  src = sources.from_config(
      p.source, split=p.split, seed=config.seed, num_examples=p.num_examples,
      image_size=d.image_size, data_dir=p.data_dir,
      fields={"image": p.image_key})
  return task_lib.Phase(
      name="pretrain", private=False, source=src,
      transforms=transforms_lib.image_pipeline(
          d.image_size, augment=p.augment, flip=p.flip),
      loss_fn=loss_fn, steps=p.steps, batch_size=p.batch_size,
      optimizer=optim.optimizer_from_config(p))


def _dp_phase(config, loss_fn) -> task_lib.Phase:
  d, t = config.data, config.train
  src = sources.from_config(
      d.source, split=d.split, seed=config.seed, num_examples=d.num_examples,
      image_size=d.image_size, data_dir=d.data_dir,
      fields={"image": d.image_key},
      num_examples_field="config.data.num_examples")
  private = config.privacy.enabled
  return task_lib.Phase(
      name="dp" if private else "train", private=private, source=src,
      transforms=transforms_lib.image_pipeline(
          d.image_size, augment=d.augment, flip=d.flip),
      loss_fn=loss_fn, steps=t.steps, batch_size=t.batch_size,
      optimizer=optim.optimizer_from_config(t), num_examples=len(src),
      canaries=lambda m, seed: synthetic.noise_canaries(m, seed,
                                                        d.image_size))


def eval_arrays(config: ml_collections.ConfigDict, num: int, split: str
                ) -> dict[str, np.ndarray]:
  """Held-out PUBLIC images float32[num, S, S, 3] in [-1, 1] and fixed mask
  keys "rng" uint32[num, 2]."""
  d = config.data
  src = sources.from_config(d.eval_source, split=split, seed=config.seed,
                            num_examples=num, image_size=d.image_size,
                            fields={"image": d.image_key})
  out = arrays.materialise(src, transforms_lib.image_pipeline(d.image_size),
                           range(num), keep=("image",))
  out["rng"] = transforms_lib.example_keys(config.seed, 0, np.arange(num))
  return out


def reconstruct(model: mae.MAE, params, images: jax.Array,
                keys: jax.Array) -> dict[str, np.ndarray]:
  """Reconstructions for plots (public images only).

  Args:
    model: the MAE.
    params: its params (the "params" collection).
    images: float32 [B, S, S, 3] in [-1, 1].
    keys: uint32 [B, 2] per-image mask keys.

  Returns:
    {"masked": input with masked patches greyed out, "pred": the raw
    prediction, "pasted": prediction on masked patches + visible input},
    each float32 [B, S, S, 3] in [-1, 1].
  """
  from dpjax.models import vit  # pylint: disable=g-import-not-at-top
  pred, mask = model.apply({"params": params}, images, keys)
  p = model.encoder["patch_size"]
  target = vit.patchify(jnp.asarray(images, jnp.float32), p)
  m = mask[..., None]
  out = {"masked": target * (1 - m), "pred": pred,
         "pasted": pred * m + target * (1 - m)}
  return {k: np.clip(np.asarray(vit.unpatchify(v, p)), -1, 1)
          for k, v in out.items()}


def build(config: ml_collections.ConfigDict) -> task_lib.Task:
  """The ViP task for `train.loop.run`."""
  d = config.data
  model = build_model(config)
  loss_fn = make_loss_fn(model)
  builders = {"pretrain": _pretrain_phase, "dp": _dp_phase}
  phases = [builders[n](config, loss_fn) for n in selected_phases(config)]

  def init_params(rng):
    images = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32)
    keys = jnp.zeros((1, 2), jnp.uint32)
    return model.init(rng, images, keys)["params"]

  depth = model.encoder["depth"]

  def features(params, images, last_k: int | None = None):
    """[B, D] pooled final tokens; with last_k (the MAE protocol, set by an
    evaluator's pred_kw) [B, k * D], the last k blocks' concatenated."""
    if last_k is not None and not 1 <= last_k <= depth:
      raise ValueError(f"config.evals.*.pred_kw.last_k={last_k} is "
                       f"invalid: use 1..encoder depth={depth}")
    return model.apply({"params": params}, images, last_k,
                       method=mae.MAE.features)

  def mae_loss(params, images, keys):
    return model.apply({"params": params}, images, keys, method=mae.MAE.loss)

  labels = tuple(k.strip() for k in d.probe_labels.split(",") if k.strip())
  labelled = lambda split, num: lambda: arrays.labelled_images(
      d.probe_source or d.eval_source, split=split, num=num,
      image_size=d.image_size, labels=labels, seed=config.seed,
      data_dir=d.probe_data_dir)
  context = evaluate.Context("vip", fns=dict(
      features=features, mae_loss=mae_loss), data=dict(
          test=lambda: eval_arrays(config, d.eval_num_examples, d.eval_split),
          probe_train=labelled(d.probe_train_split, d.probe_train_examples),
          probe_test=labelled(d.probe_test_split, d.probe_test_examples)))
  return task_lib.Task(init_params=init_params, phases=phases,
                       evaluators=evaluate.from_config(config.evals, context))
