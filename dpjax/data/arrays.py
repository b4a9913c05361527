"""Held-out evaluation records as stacked numpy arrays (public data only)."""

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dpjax.data import sources
from dpjax.data import transforms as transforms_lib


def materialise(source: Any, transforms: Sequence[Any],
                indices: Iterable[int], keep: Sequence[str],
                raw: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Records `indices` of `source` as arrays, the same ones every run.

  Record i goes through `transforms` with np.random.default_rng(i), so any
  random transform is fixed per record (evaluations comparable across
  checkpoints and runs).

  Args:
    source: random-access record source (len + getitem).
    transforms: dpjax.data.transforms list applied to each record.
    indices: the records to read, in order (n of them).
    keep: fields of the TRANSFORMED records, stacked [n, ...] (e.g.
      "image" float32[n, S, S, 3], "tokens" int32[n, L]).
    raw: fields of the untransformed records, as np.array [n] (labels,
      caption strings).

  Returns:
    {field: array} for every field of `keep` and `raw`.
  """
  rows, records = [], []
  for i in indices:
    record = source[i]
    records.append(record)
    rows.append(transforms_lib.apply(transforms, dict(record),
                                     np.random.default_rng(i)))
  out = {k: np.stack([r[k] for r in rows]) for k in keep}
  out.update({k: np.array([r[k] for r in records]) for k in raw})
  return out


def labelled_images(spec: str, *, split: str, num: int, image_size: int,
                    labels: Sequence[str], seed: int = 0, data_dir: str = ""
                    ) -> dict[str, np.ndarray]:
  """The first `num` records of a labelled PUBLIC image source.

  `spec` is a `sources.from_config` string (e.g. "tfds:imagenet2012", a
  synthetic source); records are resized to `image_size` (no augmentation).

  Returns:
    "image" float32[n, S, S, 3] in [-1, 1] and each field of `labels` as
    int[n], n = min(num, len(source)).
  """
  src = sources.from_config(spec, split=split, seed=seed, num_examples=num,
                            image_size=image_size, data_dir=data_dir)
  keep = ("image", *labels)
  ts = transforms_lib.image_pipeline(image_size, keep=keep)
  return materialise(src, ts, range(min(num, len(src))), keep=keep)
