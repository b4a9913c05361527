"""Tiny converter inputs made at test time: pictures, img2dataset-style tar
shards and image folders (for ``python -m dpjax.prepare`` tests)."""

import io
import json
import os
import tarfile
from typing import Any, Sequence

import numpy as np
from PIL import Image


def pixels(seed: int, size: tuple[int, int] = (24, 32)) -> np.ndarray:
  """A smooth random picture (a 4x4 grid of colours, upsampled)."""
  grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), np.uint8)
  return np.asarray(Image.fromarray(grid).resize(size[::-1],
                                                 Image.Resampling.BILINEAR))


def encode(image: np.ndarray, fmt: str = "PNG", **kw: Any) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kw)
  return buf.getvalue()


def tar(path: Any, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
  """samples: [(key, {ext: bytes})] -> an img2dataset-style tar shard."""
  with tarfile.open(path, "w") as t:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def folder(path: Any, rows: Sequence[dict[str, Any]],
           images: dict[str, bytes]) -> Any:
  """An image folder with ``captions.jsonl`` (one row per line)."""
  os.makedirs(path, exist_ok=True)
  for name, data in images.items():
    with open(os.path.join(path, name), "wb") as f:
      f.write(data)
  with open(os.path.join(path, "captions.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path
