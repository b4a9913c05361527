"""DP-Cap recipe (Sander et al. 2024): DP-SGD on an image captioner.

Glue only: the Captioner model, the caption source + transforms, the
per-example loss (teacher-forced token cross-entropy, each example divided by
its own token count), and the evaluators (linear probe on held-out shape and
colour labels, few-shot, zero-shot by caption likelihood, ARO-style
compositionality, held-out caption loss, greedy captions).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import evaluate
from dpjax.data import sources
from dpjax.data import synthetic
from dpjax.data import tokenizer as tokenizer_lib
from dpjax.data import transforms as transforms_lib
from dpjax.models import captioner
from dpjax.recipes import common
from dpjax.train import task as task_lib

ARO_KINDS = ("swap_color", "swap_order", "swap_relation")


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
  if config.model.vocab_size and vocab_size > config.model.vocab_size:
    raise ValueError(
        f"config.model.vocab_size={config.model.vocab_size} is smaller than "
        f"the {vocab_size} entries of data.tokenizer={config.data.tokenizer!r}"
        ": set it to 0 (the tokenizer's) or to at least that")
  mcfg = captioner.captioner_config(
      config.model.variant, vocab_size=config.model.vocab_size or vocab_size,
      max_len=config.data.max_caption_len)
  if config.model.patch_size:
    mcfg["encoder"]["patch_size"] = config.model.patch_size
  m = config.model
  mcfg["encoder"]["stem"] = m.stem
  if m.encoder_depth:
    mcfg["encoder"]["depth"] = m.encoder_depth
  if m.decoder_depth:
    mcfg["decoder"]["depth"] = m.decoder_depth
  dtype = jnp.bfloat16 if config.train.dtype == "bfloat16" else jnp.float32
  return captioner.Captioner(**mcfg, dtype=dtype)


def train_source(config: ml_collections.ConfigDict):
  d = config.data
  kwargs = {}
  if d.source.startswith("synthetic:"):
    kwargs = dict(num_examples=d.num_examples, image_size=d.image_size,
                  seed=config.seed)
  fields = None
  if not d.source.startswith("synthetic:"):
    fields = {"image": d.image_key, "caption": d.caption_key}
  return sources.make_source(d.source, split=d.split,
                             data_dir=d.data_dir or None, fields=fields,
                             **kwargs)


def _eval_arrays(config, tok, num: int, split: str) -> dict:
  """Public held-out shapes data as arrays (images, tokens, labels, ARO)."""
  d = config.data
  src = sources.make_source(d.eval_source, split=split, num_examples=num,
                            image_size=d.image_size, seed=config.seed)
  ts = transforms_lib.image_pipeline(d.image_size, tokenizer=tok,
                                     max_len=d.max_caption_len)
  records = [src[i] for i in range(num)]
  examples = [transforms_lib.apply(ts, dict(r), np.random.default_rng(i))
              for i, r in enumerate(records)]
  out = {k: np.stack([e[k] for e in examples]) for k in ("image", "tokens")}
  for k in ("shape", "color", "num_shapes"):
    out[k] = np.array([r[k] for r in records])
  out["captions"] = [r["caption"] for r in records]
  two = [i for i, r in enumerate(records) if r["num_shapes"] == 2]
  out["aro_index"] = np.array(two)
  out["aro_tokens"] = np.array([
      [tok.encode_fixed(synthetic.perturbed_captions(records[i])[k],
                        d.max_caption_len) for k in ARO_KINDS]
      for i in two], np.int32).reshape(len(two), len(ARO_KINDS),
                                       d.max_caption_len)
  return out


def _shape_prompts(shape: str) -> list[str]:
  """Zero-shot prompts of one shape class in the synthetic caption grammar
  ("a small red circle", ...): its likelihood is summed over size and colour.
  (DP-Cap's "this is a photo of a {class}" suits web captions, not these.)"""
  return [f"a {size} {color} {shape}" for size in synthetic.SIZES
          for color in synthetic.COLORS]


def _word_categories(tok) -> dict[str, list[int]]:
  """Token ids of the caption grammar's words by category (size, colour,
  shape, relation); words the tokenizer splits into pieces are left out."""
  words = {"size": synthetic.SIZES, "color": synthetic.COLORS,
           "shape": synthetic.SHAPES,
           "relation": [r.split()[0] for r in synthetic.RELATIONS]}
  out = {}
  for name, ws in words.items():
    ids = [tok.encode(w) for w in ws]
    out[name] = [i[0] for i in ids if len(i) == 1]
  return out


def optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The config's optimizer; the decoder's updates (its whole param subtree,
  AdamW's decay included) scaled by `t.decoder_lr_scale`, i.e. its learning
  rate is that multiple of the schedule's."""
  opt = common.optimizer_from_config(t)
  scale = t.decoder_lr_scale
  if scale == 1.0:
    return opt
  is_decoder = lambda params: {k: jax.tree.map(lambda _: k == "decoder", v)
                               for k, v in params.items()}
  return optax.chain(opt, optax.masked(optax.scale(scale), is_decoder))


def build(config: ml_collections.ConfigDict) -> task_lib.Task:
  """The DP-Cap task for `train.loop.run`."""
  d, t = config.data, config.train
  tok = tokenizer_lib.make_tokenizer(d.tokenizer)
  model = build_model(config, tok.vocab_size)
  src = train_source(config)

  def loss_fn(params, example):
    tokens = example["tokens"][None]
    logits = model.apply({"params": params}, example["image"][None], tokens)
    return captioner.caption_loss(logits, tokens[:, 1:])[0]

  def init_params(rng):
    images = jnp.zeros((1, d.image_size, d.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, d.max_caption_len), jnp.int32)
    return model.init(rng, images, tokens)["params"]

  phase = task_lib.Phase(
      name="dp" if config.privacy.enabled else "train",
      private=config.privacy.enabled, source=src,
      transforms=transforms_lib.image_pipeline(
          d.image_size, augment=d.augment, flip=d.flip, tokenizer=tok,
          max_len=d.max_caption_len),
      loss_fn=loss_fn, steps=t.steps, batch_size=t.batch_size,
      optimizer=optimizer(t),
      num_examples=len(src),
      canaries=lambda m, seed: synthetic.noise_canaries(
          m, seed, d.image_size, caption_words=d.max_caption_len - 2))

  def apply_fn(method):
    return lambda params, *args: model.apply({"params": params}, *args,
                                             method=method)

  features = apply_fn(captioner.Captioner.features)

  def logits(params, images, tokens):  # [B, L-1, V] for tokens[:, 1:].
    return model.apply({"params": params}, images, tokens)

  def loglik(params, images, tokens):
    return captioner.sequence_log_likelihood(logits(params, images, tokens),
                                             tokens[:, 1:])

  def per_example_loss(params, images, tokens):
    return captioner.caption_loss(logits(params, images, tokens),
                                  tokens[:, 1:])

  def decode(params, images):
    return captioner.greedy_decode(model, {"params": params}, images,
                                   d.max_caption_len, tok.bos_id, tok.eos_id)

  def evaluators():
    e = config.evals
    test = _eval_arrays(config, tok, d.eval_num_examples, d.eval_split)
    out = {}
    if e.linear_probe or e.few_shot:
      train = _eval_arrays(config, tok, e.probe_train_examples, "probe")
      labels = lambda a: {"shape": a["shape"], "color": a["color"]}
      # The labels are the caption subject's; in two-shape images which
      # shape is the subject is a coin flip, so single-shape images give
      # the unambiguous probes.
      one_tr, one_te = train["num_shapes"] == 1, test["num_shapes"] == 1
    if e.linear_probe:
      out["linear_probe"] = evaluate.linear_probe.LinearProbe(
          features, train["image"], labels(train), test["image"], labels(test))
      one = lambda a, m: {k: v[m] for k, v in labels(a).items()}
      out["linear_probe_1shape"] = evaluate.linear_probe.LinearProbe(
          features, train["image"][one_tr], one(train, one_tr),
          test["image"][one_te], one(test, one_te),
          prefix="linear_probe_1shape")
    if e.few_shot:
      # Colour is the attribute a random encoder's features already
      # separate linearly given enough examples, so the few-shot regime is
      # where learned colour shows.
      for attr in ("shape", "color"):
        out[f"few_shot_{attr}"] = evaluate.few_shot.FewShot(
            features, train["image"][one_tr], train[attr][one_tr],
            test["image"][one_te], test[attr][one_te], shots=(1, 5, 10),
            seeds=3, prefix=f"few_shot_1shape_{attr}")
    if e.zero_shot:
      prompts = np.stack([[tok.encode_fixed(p, d.max_caption_len)
                           for p in _shape_prompts(shape)]
                          for shape in synthetic.SHAPES])
      out["zero_shot"] = evaluate.caption_likelihood.ZeroShot(
          loglik, test["image"], test["shape"], prompts)
    if e.aro and len(test["aro_index"]):
      idx = test["aro_index"]
      out["aro"] = evaluate.caption_likelihood.AROScore(
          loglik, test["image"][idx], test["tokens"][idx], test["aro_tokens"],
          kinds=ARO_KINDS)
    if e.token_accuracy:
      out["token_accuracy"] = evaluate.caption_likelihood.TokenAccuracy(
          logits, test["image"], test["tokens"], _word_categories(tok))
    if e.heldout_loss:
      out["heldout_loss"] = evaluate.caption_likelihood.HeldOutCaptionLoss(
          per_example_loss, test["image"], test["tokens"])
    if e.captions:
      n = e.captions
      out["captioning"] = evaluate.caption_likelihood.Captioning(
          decode, test["image"][:n], test["captions"][:n], tok.decode_fixed)
    return out

  def summary(params):
    n = config.evals.captions
    if not n:
      return {}
    test = _eval_arrays(config, tok, n, d.eval_split)
    tokens = np.asarray(jax.device_get(decode(params, jnp.asarray(test["image"]))))
    return {"captions": [
        {"reference": ref, "generated": tok.decode_fixed(g)}
        for ref, g in zip(test["captions"], tokens)]}

  return task_lib.Task(init_params=init_params, phases=[phase],
                       evaluators=evaluators, summary=summary)
