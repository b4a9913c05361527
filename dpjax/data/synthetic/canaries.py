"""Out-of-distribution canaries for privacy audits."""

from typing import Any

import numpy as np

from dpjax.data.synthetic import common
from dpjax.data.synthetic.shapes import VOCAB_WORDS


def noise_canaries(num: int, seed: int, image_size: int, *,
                   num_classes: int = 0, caption_words: int = 0
                   ) -> list[dict[str, Any]]:
  """Out-of-distribution audit canaries: ``num`` records with "image".

  Canary i is a uniform-noise image uint8[S, S, 3]; with ``num_classes`` it
  gets a uniformly random "label", with ``caption_words`` a "caption" of that
  many words drawn uniformly from ``VOCAB_WORDS`` (14 random words of 22
  carry ~62 bits). Only memorising canary i itself lowers its loss, so
  inserted canaries score apart from left-out ones only as far as a run
  leaks. Deterministic in (seed, i), independent of the training data.
  """
  out = []
  for i in range(num):
    u = common.hash_uniform(seed, 0xCA7A, i, n=1 + caption_words + image_size**2 * 3)
    rec = {"image": (u[1 + caption_words:] * 256).astype(np.uint8).reshape(
        image_size, image_size, 3)}
    if num_classes:
      rec["label"] = int(u[0] * num_classes)
    if caption_words:
      words = (u[1:1 + caption_words] * len(VOCAB_WORDS)).astype(int)
      rec["caption"] = " ".join(VOCAB_WORDS[w] for w in words)
    out.append(rec)
  return out
