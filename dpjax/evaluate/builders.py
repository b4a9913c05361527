"""One builder per evaluator type: config fields + recipe Context -> evaluator.

`TYPES` maps each `config.evals.<name>.type` to (builder, evaluator class).
A builder takes the Context, the metric `prefix` and the entry's fields:
those it declares (which function and data sets to use, `FnName` /
`DataName`, and which label fields) and any optional argument of the
evaluator class (batch_size, shots, protocol, ...), passed through as is.
Builders run when the evaluator is first needed, so they may load data.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

import numpy as np

from dpjax.evaluate import caption_likelihood
from dpjax.evaluate import classifier
from dpjax.evaluate import few_shot as few_shot_lib
from dpjax.evaluate import fine_tune as fine_tune_lib
from dpjax.evaluate import linear_probe as linear_probe_lib
from dpjax.evaluate import reconstruction
from dpjax.evaluate import retrieval as retrieval_lib
from dpjax.evaluate.context import Context
from dpjax.evaluate.context import DataName
from dpjax.evaluate.context import FnName


def _fn(ctx: Context, name: str, kw: Mapping[str, Any] | None):
  """Function `name`, with keyword arguments `kw` bound (big_vision's
  pred_kw, e.g. {"last_k": 12} for ViP's MAE-protocol features)."""
  fn = ctx.fns[name]
  return functools.partial(fn, **kw) if kw else fn


def _split(fields: str) -> list[str]:
  return [f.strip() for f in fields.split(",") if f.strip()]


def linear_probe(ctx: Context, *, prefix: str, labels: str,
                 pred: FnName = "features",
                 pred_kw: Mapping[str, Any] | None = None,
                 train_data: DataName = "probe", test_data: DataName = "test",
                 **settings) -> linear_probe_lib.LinearProbe:
  """`labels`: comma-separated label fields of both data sets, one probe
  each."""
  tr, te = ctx.arrays(train_data), ctx.arrays(test_data)
  names = _split(labels)
  return linear_probe_lib.LinearProbe(
      _fn(ctx, pred, pred_kw), tr["image"], {k: tr[k] for k in names},
      te["image"], {k: te[k] for k in names}, prefix=prefix, **settings)


def _single_label(cls: type) -> Callable[..., Any]:
  """Builder of an evaluator made as cls(features_fn, train images, train
  labels, test images, test labels, prefix=..., **settings)."""

  def build(ctx: Context, *, prefix: str, label: str,
            pred: FnName = "features",
            pred_kw: Mapping[str, Any] | None = None,
            train_data: DataName = "probe", test_data: DataName = "test",
            **settings) -> Any:
    tr, te = ctx.arrays(train_data), ctx.arrays(test_data)
    return cls(_fn(ctx, pred, pred_kw), tr["image"], tr[label], te["image"],
               te[label], prefix=prefix, **settings)

  return build


few_shot = _single_label(few_shot_lib.FewShot)
fine_tune = _single_label(fine_tune_lib.FineTune)


def retrieval(ctx: Context, *, prefix: str, label: str = "identity",
              pred: FnName = "embed", data: DataName = "test",
              **settings) -> retrieval_lib.Retrieval:
  d = ctx.arrays(data)
  return retrieval_lib.Retrieval(ctx.fns[pred], d["image"], d[label],
                                 prefix=prefix, **settings)


def classifier_accuracy(ctx: Context, *, prefix: str, label: str = "label",
                        pred: FnName = "logits", data: DataName = "test",
                        **settings) -> classifier.ClassifierAccuracy:
  d = ctx.arrays(data)
  return classifier.ClassifierAccuracy(ctx.fns[pred], d["image"], d[label],
                                       prefix=prefix, **settings)


def heldout_mae_loss(ctx: Context, *, prefix: str, pred: FnName = "mae_loss",
                     data: DataName = "test",
                     **settings) -> reconstruction.HeldOutMAELoss:
  """`data` holds "image" and "rng" (fixed per-image mask keys)."""
  d = ctx.arrays(data)
  return reconstruction.HeldOutMAELoss(ctx.fns[pred], d["image"], d["rng"],
                                       prefix=prefix, **settings)


def heldout_caption_loss(ctx: Context, *, prefix: str,
                         pred: FnName = "caption_loss",
                         data: DataName = "test", **settings
                         ) -> caption_likelihood.HeldOutCaptionLoss:
  d = ctx.arrays(data)
  return caption_likelihood.HeldOutCaptionLoss(
      ctx.fns[pred], d["image"], d["tokens"], prefix=prefix, **settings)


def token_accuracy(ctx: Context, *, prefix: str, categories: DataName,
                   pred: FnName = "caption_logits", data: DataName = "test",
                   **settings) -> caption_likelihood.TokenAccuracy:
  """`categories`: data set {category: token ids}."""
  d = ctx.arrays(data)
  return caption_likelihood.TokenAccuracy(
      ctx.fns[pred], d["image"], d["tokens"], ctx.arrays(categories),
      prefix=prefix, **settings)


def zero_shot(ctx: Context, *, prefix: str, label: str, prompts: DataName,
              pred: FnName = "loglik", data: DataName = "test",
              **settings) -> caption_likelihood.ZeroShot:
  """`prompts`: data set whose "tokens" are int32[K, (P,) L], class k's."""
  d = ctx.arrays(data)
  return caption_likelihood.ZeroShot(
      ctx.fns[pred], d["image"], d[label], ctx.arrays(prompts)["tokens"],
      prefix=prefix, **settings)


def aro(ctx: Context, *, prefix: str, kinds: Sequence[str],
        pred: FnName = "loglik", data: DataName = "aro",
        **settings) -> caption_likelihood.AROScore:
  """`data` holds "image", "tokens" (true captions) and, per kind,
  int32[N, L] perturbed captions; `kinds` picks them (in that order)."""
  d = ctx.arrays(data)
  perturbed = np.stack([np.asarray(d[k]) for k in kinds], axis=1)
  return caption_likelihood.AROScore(
      ctx.fns[pred], d["image"], d["tokens"], perturbed, kinds=tuple(kinds),
      prefix=prefix, **settings)


def captioning(ctx: Context, *, prefix: str, num_examples: int,
               pred: FnName = "decode", detokenize: FnName = "detokenize",
               data: DataName = "test",
               **settings) -> caption_likelihood.Captioning:
  """Greedy captions of the first `num_examples` images vs "caption"."""
  d = ctx.arrays(data)
  return caption_likelihood.Captioning(
      ctx.fns[pred], d["image"][:num_examples],
      list(d["caption"][:num_examples]), ctx.fns[detokenize], prefix=prefix,
      **settings)


Builder = Callable[..., Any]
TYPES: dict[str, tuple[Builder, type]] = {
    "linear_probe": (linear_probe, linear_probe_lib.LinearProbe),
    "few_shot": (few_shot, few_shot_lib.FewShot),
    "fine_tune": (fine_tune, fine_tune_lib.FineTune),
    "retrieval": (retrieval, retrieval_lib.Retrieval),
    "classifier_accuracy": (classifier_accuracy,
                            classifier.ClassifierAccuracy),
    "heldout_mae_loss": (heldout_mae_loss, reconstruction.HeldOutMAELoss),
    "heldout_caption_loss": (heldout_caption_loss,
                             caption_likelihood.HeldOutCaptionLoss),
    "token_accuracy": (token_accuracy, caption_likelihood.TokenAccuracy),
    "zero_shot": (zero_shot, caption_likelihood.ZeroShot),
    "aro": (aro, caption_likelihood.AROScore),
    "captioning": (captioning, caption_likelihood.Captioning),
}
