"""Per-record preprocessing: grain Map / RandomMap transforms, numpy only.

They run wherever records are loaded -- in grain worker processes when the
pipeline has ``num_workers > 0``. Randomised transforms (crop, flip) take a
``np.random.Generator`` that the pipeline derives from ``(seed, step,
index)`` (``example_generator``), so augmentation is deterministic and
independent of worker count or resumption. Each transform also works in a
plain grain pipeline (``ds.map(t)`` / ``ds.random_map(t)``).

Data problems raise ``dpjax.data.BadRecord`` (an image that does not decode,
a caption with no tokens, a missing field), which the Poisson pipelines turn
into a zero row; anything else is a bug and propagates.
"""

import io
import struct
from typing import Any, Sequence
import zlib

import grain
import numpy as np

from dpjax.data import BadRecord
from dpjax.privacy import sampling

Record = dict[str, Any]

_RNG_TAG = 0xA11CE  # per-example "rng" leaf
_AUG_TAG = 0xB0B  # augmentation Generator


# SplitMix64-style hash of uint64 arrays (broadcast) -> uint64: the one keyed
# hash of the code base (privacy.sampling's b-cyclic partitions use it too).
mix = sampling.mix


def example_keys(seed: int, step: int, indices: np.ndarray) -> np.ndarray:
  """uint32[n, 2] raw PRNG keys, one per example, from (seed, step, index).

  Usable as jax.random raw keys (``jax.random.wrap_key_data`` or directly as
  an old-style uint32[2] key). Distinct (seed, step, index) give
  independent-looking keys; no jax needed.
  """
  h = mix(np.uint64(_RNG_TAG), np.uint64(seed), np.uint64(step),
           np.asarray(indices, np.int64).astype(np.uint64))
  out = np.empty(h.shape + (2,), np.uint32)
  out[..., 0] = (h >> np.uint64(32)).astype(np.uint32)
  out[..., 1] = (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)
  return out


def example_generator(seed: int, step: int, index: int,
                      tag: int = _AUG_TAG) -> np.random.Generator:
  """numpy Generator for augmenting example ``index`` at ``step``."""
  k = mix(np.uint64(tag), np.uint64(seed), np.uint64(step),
           np.uint64(int(index) & 0xFFFFFFFFFFFFFFFF))
  return np.random.Generator(np.random.Philox(key=int(k)))


def apply(transforms: Sequence[Any], record: Record,
          rng: np.random.Generator) -> Record:
  """Applies grain Map/RandomMap transforms or plain callables in order."""
  for t in transforms:
    if isinstance(t, grain.transforms.RandomMap):
      record = t.random_map(record, rng)
    elif isinstance(t, grain.transforms.Map):
      record = t.map(record)
    else:
      record = t(record)
  return record


def _decode_bytes(value: bytes) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # What Pillow raises for corrupt, truncated or hostile files (unidentified
  # and truncated files are OSErrors; some plugins raise the others).
  errors = (OSError, ValueError, SyntaxError, EOFError, struct.error,
            zlib.error, Image.DecompressionBombError)
  try:
    with Image.open(io.BytesIO(bytes(value))) as im:
      return np.asarray(im.convert("RGB"))
  except errors as e:
    detail = str(e).split(" <_io.BytesIO")[0]  # Not the buffer's address.
    raise BadRecord("decode", f"image does not decode: {type(e).__name__}: "
                    f"{detail}") from e


def decode_image(value: Any) -> np.ndarray:
  """PNG/JPEG bytes or an array -> uint8[H, W, 3].

  Raises:
    BadRecord: ("decode") bytes that are not a readable image (corrupt,
      truncated, empty).
  """
  if isinstance(value, (bytes, bytearray, memoryview)):
    value = _decode_bytes(value)
  elif value is None:
    raise BadRecord("decode", "the image is missing (None)")
  arr = np.asarray(value)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  elif arr.shape[-1] == 4:
    arr = arr[..., :3]
  return arr.astype(np.uint8, copy=False)


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if img.shape[:2] == tuple(size):
    return img
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR)
  return np.asarray(out)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (size[0], size[1])


class DecodeImage(grain.transforms.Map):
  """record[key]: encoded bytes or array -> uint8[H, W, 3]."""

  def __init__(self, key: str = "image"):
    self.key = key

  def map(self, record: Record) -> Record:
    if self.key not in record:
      raise BadRecord("missing_field", f"DecodeImage: record has no "
                      f"{self.key!r} field; it has {sorted(record)}. Fix "
                      "the image key or data.fields.")
    return {**record, self.key: decode_image(record[self.key])}


class Resize(grain.transforms.Map):
  """Bilinear resize of uint8[H, W, 3] to ``size``."""

  def __init__(self, size: int | Sequence[int], key: str = "image"):
    self.size, self.key = _pair(size), key

  def map(self, record: Record) -> Record:
    return {**record, self.key: _resize(record[self.key], self.size)}


class RandomResizedCrop(grain.transforms.RandomMap):
  """Inception-style crop: area fraction in ``scale``, aspect in ``ratio``,
  resized to ``size``; falls back to the full image after 10 tries."""

  def __init__(self, size: int | Sequence[int],
               scale: tuple[float, float] = (0.2, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3),
               key: str = "image"):
    self.size, self.scale, self.ratio, self.key = _pair(size), scale, ratio, key

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    img = record[self.key]
    h, w = img.shape[:2]
    for _ in range(10):
      area = h * w * rng.uniform(*self.scale)
      aspect = np.exp(rng.uniform(np.log(self.ratio[0]),
                                  np.log(self.ratio[1])))
      cw = int(round(np.sqrt(area * aspect)))
      ch = int(round(np.sqrt(area / aspect)))
      if 0 < cw <= w and 0 < ch <= h:
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        img = img[y0:y0 + ch, x0:x0 + cw]
        break
    return {**record, self.key: _resize(np.ascontiguousarray(img), self.size)}


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability ``p``."""

  def __init__(self, p: float = 0.5, key: str = "image"):
    self.p, self.key = p, key

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if rng.uniform() < self.p:
      return {**record, self.key: record[self.key][:, ::-1].copy()}
    return record


class Normalize(grain.transforms.Map):
  """uint8 -> float32: to [-1, 1] by default, else (x/255 - mean) / std."""

  def __init__(self, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, key: str = "image"):
    self.key = key
    self.mean = None if mean is None else np.asarray(mean, np.float32)
    self.std = None if std is None else np.asarray(std, np.float32)

  def map(self, record: Record) -> Record:
    x = np.asarray(record[self.key], np.float32) / 255.0
    if self.mean is None:
      x = 2.0 * x - 1.0
    else:
      x = (x - self.mean) / self.std
    return {**record, self.key: x.astype(np.float32)}


class Tokenize(grain.transforms.Map):
  """record[key] (str/bytes) -> record[out_key] = int32[max_len].

  A caption that is missing (None) or tokenises to nothing (empty,
  whitespace) raises ``BadRecord("empty_caption")`` unless ``allow_empty``:
  trained on, it would teach "bos, eos" from a record with no text.
  """

  def __init__(self, tokenizer: Any, max_len: int, key: str = "caption",
               out_key: str = "tokens", allow_empty: bool = False):
    self.tokenizer, self.max_len = tokenizer, max_len
    self.key, self.out_key = key, out_key
    self.allow_empty = allow_empty

  def map(self, record: Record) -> Record:
    text = record.get(self.key)
    if text is None and not self.allow_empty:
      raise BadRecord("empty_caption", f"Tokenize: record has no "
                      f"{self.key!r} (fields: {sorted(record)})")
    ids = self.tokenizer.encode_fixed("" if text is None else text,
                                      self.max_len)
    # bos + eos and nothing between: the caption has no tokens.
    if (not self.allow_empty and self.max_len > 2 and
        np.count_nonzero(ids != self.tokenizer.pad_id) <= 2):
      raise BadRecord("empty_caption",
                      f"Tokenize: {self.key!r} has no tokens")
    return {**record, self.out_key: ids}


class Keep(grain.transforms.Map):
  """Keeps only ``keys`` (drop strings before batching), as numpy arrays."""

  def __init__(self, keys: Sequence[str]):
    self.keys = tuple(keys)

  def map(self, record: Record) -> Record:
    missing = [k for k in self.keys if k not in record]
    if missing:
      # A bad record if some records lack it; if all do, the pipeline's
      # padding template (the first record that loads) fails with this.
      raise BadRecord("missing_field", f"Keep({list(self.keys)}): record "
                      f"lacks {missing}; it has {sorted(record)}. Fix the "
                      "keys or the field map.")
    return {k: np.asarray(record[k]) for k in self.keys}


class Rename(grain.transforms.Map):
  """Renames fields: ``{old_name: new_name}``."""

  def __init__(self, mapping: dict[str, str]):
    self.mapping = dict(mapping)

  def map(self, record: Record) -> Record:
    return {self.mapping.get(k, k): v for k, v in record.items()}


def image_pipeline(image_size: int, *, augment: bool = False,
                   flip: bool | None = None, tokenizer: Any = None,
                   max_len: int = 0,
                   keep: Sequence[str] = ("image",)) -> list[Any]:
  """Standard list: decode, (crop+flip | resize), normalise, [tokenize], keep.

  Args:
    image_size: output side S; images become float32[S, S, 3] in [-1, 1].
    augment: random-resized-crop (scale 0.2-1).
    flip: horizontal flip (default: same as augment). Turn it off for
      captions with "left of" / "right of": a flip makes them false.
    tokenizer: if set, "caption" -> "tokens" int32[max_len].
    max_len: caption length in tokens (with bos/eos).
    keep: fields to keep ("tokens" is added when tokenizing).

  Returns:
    A list of transforms for ``PoissonBatches`` / ``arrays.materialise``.
  """
  ts = [DecodeImage()]
  ts.append(RandomResizedCrop(image_size) if augment else Resize(image_size))
  if augment if flip is None else flip:
    ts.append(RandomFlip())
  ts.append(Normalize())
  keep = list(keep)
  if tokenizer is not None:
    ts.append(Tokenize(tokenizer, max_len))
    if "tokens" not in keep:
      keep.append("tokens")
  ts.append(Keep(keep))
  return ts


class Augmult(grain.transforms.RandomMap):
  """Augmentation multiplicity: `k` independently augmented copies of one
  record, each field stacked to [k, ...] (De et al. 2022).

  Copy j runs `transforms` with its own generator keyed by 128 bits drawn
  from the record's (secret, per-example) one, so the copies are
  independent augmentations of the same record: still ONE privacy unit,
  whose gradient the loss averages over the copies before clipping.
  """

  def __init__(self, transforms: Sequence[Any], k: int):
    self.transforms, self.k = list(transforms), int(k)

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    keys = rng.integers(0, 2**64, size=(self.k, 2), dtype=np.uint64)
    copies = [apply(self.transforms, dict(record), np.random.Generator(
        np.random.Philox(key=(int(hi) << 64) | int(lo)))) for hi, lo in keys]
    return {f: np.stack([c[f] for c in copies]) for f in copies[0]}
