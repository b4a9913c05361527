"""Caption-likelihood evaluators for captioning models (DP-Cap).

The model enters only through functions:
  loglik_fn(params, images[B, H, W, C], tokens int32[B, L]) -> [B]
      summed log-probability of the (non-padding) caption tokens under
      teacher forcing;
  loss_fn(params, images, tokens) -> [B] per-example mean token CE;
  decode_fn(params, images[B, ...]) -> int[B, L_out] greedy caption tokens.

* HeldOutCaptionLoss: mean held-out caption loss.
* ZeroShot: each class is scored by the log-likelihood of its prompt
  ("this is a photo of a {class}") given the image; prediction = argmax.
  Image batches are tiled against (chunks of) the K prompts, so one call
  scores b images x k prompts.
* AROScore: ARO-style compositionality (VG-Relation / VG-Attribution /
  order): an image counts as correct iff its true caption is strictly more
  likely than each of its P perturbed captions.
* TokenAccuracy: teacher-forced next-token accuracy per word category
  (e.g. colour / shape / relation words): which parts of a caption the model
  reads from the image.
* Captioning: greedy captions vs references: exact match, position-wise word
  accuracy and bag-of-words F1; samples(params, n) returns caption strings.
"""

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.evaluate import linear_probe

ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class HeldOutCaptionLoss:
  """Mean per-example caption cross-entropy on held-out pairs."""

  def __init__(self, loss_fn: ScoreFn, images: np.ndarray, tokens: np.ndarray,
               batch_size: int = 256, prefix: str = "caption"):
    """Initialises the evaluator.

    Args:
      loss_fn: (params, images[B, ...], tokens[B, L]) -> [B] mean token CE.
      images: [N, H, W, C].
      tokens: int32[N, L] caption tokens.
      batch_size: examples per call.
      prefix: metric name prefix.
    """
    self.loss_fn, self.batch_size, self.prefix = loss_fn, batch_size, prefix
    self.images, self.tokens = images, np.asarray(tokens, np.int32)

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/heldout_loss}: mean over examples of loss_fn."""
    losses = linear_probe.batched_apply(
        self.loss_fn, params, (self.images, self.tokens), self.batch_size)
    return {f"{self.prefix}/heldout_loss": float(np.mean(losses))}


class TokenAccuracy:
  """Teacher-forced next-token accuracy, per category of target word."""

  def __init__(self, logits_fn: ScoreFn, images: np.ndarray,
               tokens: np.ndarray, categories: Mapping[str, Sequence[int]],
               batch_size: int = 256, prefix: str = "caption"):
    """Initialises the evaluator.

    Args:
      logits_fn: (params, images[B, ...], tokens[B, L]) -> [B, L-1, V]
        teacher-forced logits for the targets tokens[:, 1:].
      images: [N, H, W, C].
      tokens: int32[N, L] captions (BOS first, padded).
      categories: {name: token ids}: a target position counts towards a
        category when its true token is one of the ids.
      batch_size: examples per call.
      prefix: metric name prefix.
    """
    self.logits_fn, self.images = logits_fn, images
    self.tokens = np.asarray(tokens, np.int32)
    self.categories = {k: np.asarray(v) for k, v in categories.items()}
    self.batch_size, self.prefix = batch_size, prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/<category>_token_acc}: the fraction of target
    positions of that category where the argmax over the whole vocabulary is
    the true token (categories absent from the data are left out)."""
    fn = lambda p, im, tok: jnp.argmax(self.logits_fn(p, im, tok), axis=-1)
    preds = linear_probe.batched_apply(fn, params, (self.images, self.tokens),
                                       self.batch_size)
    targets = self.tokens[:, 1:]
    out = {}
    for name, ids in self.categories.items():
      at = np.isin(targets, ids)
      if at.any():
        out[f"{self.prefix}/{name}_token_acc"] = float(
            np.mean(preds[at] == targets[at]))
    return out


def candidate_logliks(loglik_fn: ScoreFn, params: Any, images: np.ndarray,
                      candidates: np.ndarray, batch_size: int = 256,
                      shared: bool = False) -> np.ndarray:
  """Log-likelihood of every candidate caption of every image.

  Args:
    loglik_fn: (params, images[B, ...], tokens[B, L]) -> [B].
    params: model parameters.
    images: [N, H, W, C].
    candidates: int[K, L] captions shared by all images (shared=True), or
      int[N, K, L] per-image captions.
    batch_size: approximate (image, caption) pairs per call: b =
      max(1, batch_size // K) images are tiled against k = min(K, batch_size)
      captions at a time.
    shared: whether candidates are the same for all images.

  Returns:
    float [N, K] log-likelihoods.
  """
  n, kk = len(images), candidates.shape[-2]
  kc = max(1, min(kk, batch_size))
  b = max(1, min(n, batch_size // kc))
  cands = np.asarray(candidates, np.int32)
  pad_k = -kk % kc  # Pad captions (zeros) to a multiple of kc; dropped.
  cands = np.concatenate(
      [cands, np.zeros(cands.shape[:-2] + (pad_k, cands.shape[-1]), np.int32)],
      axis=-2)
  fn = jax.jit(_tiled_loglik, static_argnums=0)
  out = np.zeros((n, kk + pad_k), np.float32)
  for start in range(0, n, b):
    ims = np.asarray(images[start:start + b])
    real = len(ims)
    ims = np.concatenate([ims, np.zeros((b - real,) + ims.shape[1:],
                                        ims.dtype)])
    for k0 in range(0, kk + pad_k, kc):
      if shared:
        toks = np.broadcast_to(cands[None, k0:k0 + kc],
                               (b, kc, cands.shape[-1]))
      else:
        toks = cands[start:start + b, k0:k0 + kc]
        toks = np.concatenate([toks, np.zeros((b - real,) + toks.shape[1:],
                                              np.int32)])
      ll = fn(loglik_fn, params, ims, np.ascontiguousarray(toks))
      out[start:start + real, k0:k0 + kc] = np.asarray(ll)[:real]
  return out[:, :kk]


def _tiled_loglik(loglik_fn, params, images, tokens):
  """images [b, ...] x tokens [b, k, L] -> [b, k] in one loglik_fn call."""
  b, k, length = tokens.shape
  ims = jnp.repeat(images, k, axis=0)  # Image i repeated for its k captions.
  ll = loglik_fn(params, ims, tokens.reshape(b * k, length))
  return ll.reshape(b, k)


class ZeroShot:
  """Zero-shot classification by prompt log-likelihood."""

  def __init__(self, loglik_fn: ScoreFn, images: np.ndarray,
               labels: np.ndarray, class_prompts_tokens: np.ndarray,
               batch_size: int = 256, prefix: str = "zero_shot"):
    """Initialises the evaluator.

    Args:
      loglik_fn: (params, images[B, ...], tokens[B, L]) -> [B] summed
        log-probability of the caption tokens.
      images: [N, H, W, C].
      labels: int[N] in [0, K).
      class_prompts_tokens: int32[K, L], tokenised "this is a photo of a
        {class}", padded as loglik_fn expects; or int32[K, P, L]: P prompts
        per class whose likelihoods are summed (log-sum-exp), e.g. every
        attribute combination of a class for data with a fixed grammar.
      batch_size: (image, prompt) pairs per call.
      prefix: metric name prefix.
    """
    self.loglik_fn, self.images = loglik_fn, images
    self.labels = np.asarray(labels)
    self.prompts = np.asarray(class_prompts_tokens, np.int32)
    self.batch_size, self.prefix = batch_size, prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/acc, prefix/chance = 1/K}."""
    k, length = self.prompts.shape[0], self.prompts.shape[-1]
    ll = candidate_logliks(self.loglik_fn, params, self.images,
                           self.prompts.reshape(-1, length), self.batch_size,
                           shared=True)
    ll = np.logaddexp.reduce(ll.reshape(len(ll), k, -1), axis=-1)
    acc = float(np.mean(np.argmax(ll, axis=1) == self.labels))
    return {f"{self.prefix}/acc": acc,
            f"{self.prefix}/chance": 1.0 / len(self.prompts)}


class AROScore:
  """Fraction of images whose true caption beats all perturbed captions."""

  def __init__(self, loglik_fn: ScoreFn, images: np.ndarray,
               true_tokens: np.ndarray, perturbed_tokens: np.ndarray,
               batch_size: int = 256, prefix: str = "aro",
               kinds: Sequence[str] = ()):
    """Initialises the evaluator.

    Args:
      loglik_fn: (params, images[B, ...], tokens[B, L]) -> [B].
      images: [N, H, W, C].
      true_tokens: int32[N, L] correct captions.
      perturbed_tokens: int32[N, P, L] captions with attributes / relations
        / word order swapped.
      batch_size: (image, caption) pairs per call.
      prefix: metric name prefix (e.g. "aro_vg_relation").
      kinds: optional P names of the perturbations (e.g. "swap_order"): each
        is also scored as ARO's own benchmarks are, true vs that one
        perturbation (pairwise, chance 1/2).
    """
    if kinds and len(kinds) != np.shape(perturbed_tokens)[1]:
      raise ValueError(f"{len(kinds)} kinds for "
                       f"{np.shape(perturbed_tokens)[1]} perturbations")
    self.kinds = tuple(kinds)
    true_tokens = np.asarray(true_tokens, np.int32)
    perturbed = np.asarray(perturbed_tokens, np.int32)
    self.candidates = np.concatenate([true_tokens[:, None], perturbed], axis=1)
    self.loglik_fn, self.images = loglik_fn, images
    self.batch_size, self.prefix = batch_size, prefix

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/acc, prefix/chance = 1/(P+1)} (true beats all P) and,
    with kinds, {prefix/<kind>_acc} (true beats that one; chance 1/2) and
    their mean prefix/pairwise_acc. Ties count as wrong. No images (e.g.
    none with two shapes among a few held-out ones): no metrics."""
    if not len(self.images):
      return {}
    ll = candidate_logliks(self.loglik_fn, params, self.images,
                           self.candidates, self.batch_size, shared=False)
    out = {f"{self.prefix}/acc": float(np.mean(ll[:, 0] > ll[:, 1:].max(1))),
           f"{self.prefix}/chance": 1.0 / self.candidates.shape[1]}
    if self.kinds:
      wins = ll[:, :1] > ll[:, 1:]  # [N, P]
      out.update({f"{self.prefix}/{k}_acc": float(w)
                  for k, w in zip(self.kinds, wins.mean(0))})
      out[f"{self.prefix}/pairwise_acc"] = float(wins.mean())
    return out


def caption_scores(preds: Sequence[str], refs: Sequence[str]
                   ) -> dict[str, float]:
  """Exact match, position-wise word accuracy and bag-of-words F1.

  Strings are compared lower-cased and whitespace-split.

  Args:
    preds: predicted captions.
    refs: reference captions, same length.

  Returns:
    {"exact_match", "word_acc", "word_f1"}, each averaged over pairs.
  """
  em, acc, f1 = [], [], []
  for p, r in zip(preds, refs, strict=True):
    pw, rw = p.lower().split(), r.lower().split()
    em.append(float(pw == rw))
    longest = max(len(pw), len(rw))
    acc.append(sum(a == b for a, b in zip(pw, rw)) / longest if longest else 1.)
    common = sum((Counter(pw) & Counter(rw)).values())
    f1.append(2 * common / (len(pw) + len(rw)) if pw or rw else 1.0)
  return {"exact_match": float(np.mean(em)), "word_acc": float(np.mean(acc)),
          "word_f1": float(np.mean(f1))}


class Captioning:
  """Greedy captions scored against references; samples for inspection."""

  def __init__(self, decode_fn: Callable[[Any, jax.Array], jax.Array],
               images: np.ndarray, references: Sequence[str],
               detokenize: Callable[[np.ndarray], str],
               batch_size: int = 64, jit: bool = True,
               prefix: str = "captioning"):
    """Initialises the evaluator.

    Args:
      decode_fn: (params, images[B, ...]) -> int[B, L_out] greedy tokens.
      images: [N, H, W, C].
      references: N reference captions.
      detokenize: int[L_out] tokens of one caption -> string (stops at EOS,
        drops padding).
      batch_size: images per decode call.
      jit: jit decode_fn (disable if it is not traceable).
      prefix: metric name prefix.
    """
    if len(references) != len(images):
      raise ValueError(f"{len(references)} references for {len(images)} "
                       "images.")
    self.decode_fn, self.images = decode_fn, images
    self.references, self.detokenize = list(references), detokenize
    self.batch_size, self.jit, self.prefix = batch_size, jit, prefix

  def captions(self, params: Any, n: int | None = None) -> list[str]:
    """Greedy captions of the first n images (all when n is None)."""
    images = self.images[:n]
    if self.jit:
      toks = linear_probe.batched_apply(self.decode_fn, params, images,
                                        self.batch_size)
    else:
      toks = np.concatenate([
          np.asarray(self.decode_fn(params, images[s:s + self.batch_size]))
          for s in range(0, len(images), self.batch_size)])
    return [self.detokenize(np.asarray(t)) for t in toks]

  def samples(self, params: Any, n: int = 8) -> list[str]:
    """n example greedy captions (strings, for logging by the caller)."""
    return self.captions(params, n)

  def run(self, params: Any) -> dict[str, float]:
    """Returns {prefix/exact_match, prefix/word_acc, prefix/word_f1}."""
    scores = caption_scores(self.captions(params), self.references)
    return {f"{self.prefix}/{k}": v for k, v in scores.items()}
