"""DP-Cap recipe (Sander et al. 2024): DP-SGD on an image captioner.

Glue only: the Captioner model, the caption source + transforms, the
per-example loss (teacher-forced token cross-entropy, each example divided by
its own token count), and the evaluators (linear probe on held-out shape and
colour labels, few-shot, zero-shot by caption likelihood, ARO-style
compositionality, held-out caption loss, greedy captions).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import evaluate
from dpjax.data import arrays
from dpjax.data import sources
from dpjax.data import synthetic
from dpjax.data import tokenizer as tokenizer_lib
from dpjax.data import transforms as transforms_lib
from dpjax.models import captioner
from dpjax.train import optim
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
  return sources.from_config(
      d.source, split=d.split, seed=config.seed, num_examples=d.num_examples,
      image_size=d.image_size, data_dir=d.data_dir,
      fields={"image": d.image_key, "caption": d.caption_key},
      num_examples_field="config.data.num_examples")


def _eval_source(config, split: str, num: int):
  d = config.data
  return sources.from_config(d.eval_source, split=split, seed=config.seed,
                             num_examples=num, image_size=d.image_size)


def eval_arrays(config, tok, num: int, split: str) -> dict[str, np.ndarray]:
  """Held-out public shapes: "image" float32[num, S, S, 3], "tokens"
  int32[num, L], "shape" / "color" / "num_shapes" int[num], "caption"."""
  d = config.data
  ts = transforms_lib.image_pipeline(d.image_size, tokenizer=tok,
                                     max_len=d.max_caption_len)
  return arrays.materialise(
      _eval_source(config, split, num), ts, range(num),
      keep=("image", "tokens"), raw=("shape", "color", "num_shapes",
                                     "caption"))


def _aro_arrays(config, tok, test: dict) -> dict[str, np.ndarray]:
  """The two-shape test images, their "tokens" and, per ARO kind,
  int32[n, L] tokens of the caption with that perturbation."""
  d = config.data
  two = np.flatnonzero(test["num_shapes"] == 2)
  src = _eval_source(config, d.eval_split, d.eval_num_examples)
  perturbed = [synthetic.perturbed_captions(src[i]) for i in two]
  out = {"image": test["image"][two], "tokens": test["tokens"][two]}
  for kind in ARO_KINDS:
    out[kind] = np.array(
        [tok.encode_fixed(p[kind], d.max_caption_len) for p in perturbed],
        np.int32).reshape(len(two), d.max_caption_len)
  return out


def _one_shape(a: dict) -> dict:
  """Single-shape images only: the labels are the caption subject's, and in
  two-shape images which shape is the subject is a coin flip."""
  return {k: v[a["num_shapes"] == 1] for k, v in a.items()}


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
  opt = optim.optimizer_from_config(t)
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

  def features(params, images):  # [B, D] pooled encoder features.
    return model.apply({"params": params}, images,
                       method=captioner.Captioner.features)

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

  test = functools.cache(lambda: eval_arrays(
      config, tok, d.eval_num_examples, d.eval_split))
  probe = functools.cache(lambda: eval_arrays(
      config, tok, d.probe_train_examples, "probe"))
  probe_labels = tuple(k.strip() for k in d.probe_labels.split(",")
                       if k.strip())
  labelled = lambda split, num: functools.cache(
      lambda: arrays.labelled_images(
          d.probe_source or d.eval_source, split=split, num=num,
          image_size=d.image_size, labels=probe_labels, seed=config.seed,
          data_dir=d.probe_data_dir))
  prompts = lambda: {"tokens": np.stack([
      [tok.encode_fixed(p, d.max_caption_len) for p in _shape_prompts(shape)]
      for shape in synthetic.SHAPES])}
  context = evaluate.Context("dpcap", fns=dict(
      features=features, loglik=loglik,
      caption_logits=logits, caption_loss=per_example_loss, decode=decode,
      detokenize=tok.decode_fixed), data=dict(
          test=test, probe=probe, test_1shape=lambda: _one_shape(test()),
          probe_1shape=lambda: _one_shape(probe()),
          aro=lambda: _aro_arrays(config, tok, test()),
          shape_prompts=prompts,
          word_categories=lambda: _word_categories(tok),
          probe_train=labelled(d.probe_train_split, d.probe_train_examples),
          probe_test=labelled(d.probe_test_split, d.probe_test_examples)))
  evals = evaluate.from_config(config.evals, context)

  def summary(params):
    """Greedy captions of the images "captioning" evaluators score."""
    out = []
    for s in evals.values():
      if s.type == "captioning":
        e = s.evaluator()
        out += [{"reference": ref, "generated": gen}
                for ref, gen in zip(e.references, e.captions(params))]
    return {"captions": out} if out else {}

  return task_lib.Task(init_params=init_params, phases=[phase],
                       evaluators=evals, summary=summary)
