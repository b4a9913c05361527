"""Embedded procedural datasets: no download, deterministic, any size.

Every record is a pure function of ``(seed, split, index)``: random numbers
come from a counter-based hash (SplitMix64), so ``source[i]`` costs the same
for ``i = 0`` and ``i = 2e9`` and nothing of size N is ever allocated.
All sources follow grain's ``RandomAccessDataSource`` protocol (``__len__``,
``__getitem__(i) -> dict``) and render with numpy only.

* ``ShapesCaptions``: 1-2 coloured shapes with a grammar caption
  ("a small red triangle above a large blue circle") and labels
  (DP-Cap, ViP's private stage, linear probes).
* ``Classes``: one shape per image, ``label = shape * len(COLORS) + color``
  (30 classes; DP continual pre-training).
* ``Textures``: shader-like images (Shaders21k stand-in; ViP's warm start).
* ``Identities``: user-partitioned glyph "identities" (DP-FedEmb).
* ``noise_canaries``: out-of-distribution canaries for privacy audits
  (noise images with random labels or random-word captions).
"""

import zlib
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB = np.array([(220, 40, 40), (40, 170, 60), (40, 80, 230),
                      (235, 215, 40), (150, 60, 200), (250, 140, 20)],
                     np.float32)
SIZES = ("small", "large")
# Object radius as a fraction of the image side, per size. Large enough that
# a tiny ViT (32 px, 8 px patches) can tell the shapes apart; <= 1/4 so two
# objects fit in separate halves.
SIZE_RADIUS = (0.18, 0.25)
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of",
                    "above": "below", "below": "above"}
ZERO_SHOT_TEMPLATE = "this is a photo of a {}"
# Every word the caption grammar and the prompts can produce.
VOCAB_WORDS = tuple(sorted(set(
    ("a this is photo of".split() + list(SIZES) + list(COLORS) + list(SHAPES)
     + " ".join(RELATIONS).split()))))

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _split_tag(split: str) -> int:
  return zlib.crc32(split.encode()) & 0xFFFFFFFF


def hash_uniform(*keys: int, n: int) -> np.ndarray:
  """n uniform floats in [0, 1) from integer keys (SplitMix64, vectorized).

  Args:
    *keys: non-negative ints (seed, tags, index, ...).
    n: number of draws.

  Returns:
    float64[n], a deterministic function of (keys, position).
  """
  h = 0x9E3779B97F4A7C15
  for k in keys:
    h = ((h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9
         + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  with np.errstate(over="ignore"):
    z = np.uint64(h) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(
        0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[None, :], c[:, None]  # x [1, W], y [H, 1]


def shape_mask(shape: int, cx: float, cy: float, r: float,
               size: int) -> np.ndarray:
  """Boolean [size, size] mask of one shape centred at (cx, cy), radius r."""
  x, y = _grid(size)
  dx, dy = np.abs(x - cx), np.abs(y - cy)
  name = SHAPES[shape]
  if name == "circle":
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  if name == "square":
    return (dx <= 0.8 * r) & (dy <= 0.8 * r)
  if name == "triangle":  # apex up
    t = (y - cy) + r
    return (t >= 0) & (t <= 2 * r) & (dx <= 0.5 * t + 0.5)
  if name == "cross":
    w = max(r / 3.0, 1.0)
    return ((dx <= r) & (dy <= w)) | ((dy <= r) & (dx <= w))
  if name == "diamond":
    return dx + dy <= r
  raise ValueError(f"unknown shape {shape}")


def caption_for(objs: list[dict[str, int]], relation: int) -> str:
  """Grammar caption for one object, or 'A <relation> B' for two."""
  def phrase(o):
    return f"a {SIZES[o['size']]} {COLORS[o['color']]} {SHAPES[o['shape']]}"
  if len(objs) == 1:
    return phrase(objs[0])
  return f"{phrase(objs[0])} {RELATIONS[relation]} {phrase(objs[1])}"


def perturbed_captions(record: dict[str, Any]) -> dict[str, str]:
  """ARO-style false captions for a ShapesCaptions record.

  Every returned caption differs from ``record["caption"]`` and is false for
  the image (relations and attribute binding are visible in the image).

  Args:
    record: a ShapesCaptions record.

  Returns:
    {kind: caption} with kinds among "swap_color", "swap_size",
    "swap_shape" (attributes exchanged between the two objects),
    "swap_order" (B rel A), "swap_relation" (A inverse-rel B), and for
    one-object images "wrong_color" / "wrong_shape".
  """
  a = {"shape": record["shape"], "color": record["color"],
       "size": record["size"]}
  true = record["caption"]
  out = {}
  if record["num_shapes"] == 1:
    out["wrong_color"] = caption_for(
        [dict(a, color=(a["color"] + 1) % len(COLORS))], -1)
    out["wrong_shape"] = caption_for(
        [dict(a, shape=(a["shape"] + 1) % len(SHAPES))], -1)
    return out
  b = {"shape": record["shape2"], "color": record["color2"],
       "size": record["size2"]}
  rel = record["relation"]
  for attr in ("color", "size", "shape"):
    if a[attr] != b[attr]:
      out[f"swap_{attr}"] = caption_for(
          [dict(a, **{attr: b[attr]}), dict(b, **{attr: a[attr]})], rel)
  out["swap_order"] = caption_for([b, a], rel)
  inv = RELATIONS.index(INVERSE_RELATION[RELATIONS[rel]])
  out["swap_relation"] = caption_for([a, b], inv)
  return {k: v for k, v in out.items() if v != true}


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
    u = hash_uniform(seed, 0xCA7A, i, n=1 + caption_words + image_size**2 * 3)
    rec = {"image": (u[1 + caption_words:] * 256).astype(np.uint8).reshape(
        image_size, image_size, 3)}
    if num_classes:
      rec["label"] = int(u[0] * num_classes)
    if caption_words:
      words = (u[1:1 + caption_words] * len(VOCAB_WORDS)).astype(int)
      rec["caption"] = " ".join(VOCAB_WORDS[w] for w in words)
    out.append(rec)
  return out


def zero_shot_prompts(template: str = ZERO_SHOT_TEMPLATE,
                      classes: tuple[str, ...] = SHAPES) -> list[str]:
  """Prompts for zero-shot classification, one per class (label order)."""
  return [template.format(c) for c in classes]


def _background(u: np.ndarray, size: int) -> np.ndarray:
  """Light, low-contrast textured background [size, size, 3] float32."""
  x, y = _grid(size)
  base = 200.0 + 40.0 * u[:3]
  fx, fy, ph, amp = u[3] * 0.6, u[4] * 0.6, u[5] * 6.28, 6.0 * u[6]
  tex = amp * np.sin(fx * x + fy * y + ph)
  return base[None, None, :] + tex[:, :, None]


class ShapesCaptions:
  """Captioned coloured shapes; ``record[i]`` is deterministic in (seed, i).

  Record: {"image": uint8[S, S, 3], "caption": str, "shape", "color",
  "size" (of the first object, the caption's subject), "label"
  (shape * len(COLORS) + color), "num_shapes", "relation" (index into
  RELATIONS, -1 if one shape), "shape2", "color2", "size2" (-1 if one)}.
  Two objects are placed in separate halves (left/right for horizontal
  relations, top/bottom for vertical ones) so the relation is unambiguous,
  both near the middle of the other axis (so the subject's position alone
  names the relation, as in "the circle on the left").
  """

  def __init__(self, num_examples: int, image_size: int = 32, seed: int = 0,
               split: str = "train", max_shapes: int = 2):
    if max_shapes not in (1, 2):
      raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}.")
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.split = split
    self.max_shapes = max_shapes
    self._tag = _split_tag(split)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed}, "
            f"split={self.split!r})")

  @property
  def num_classes(self) -> int:
    return len(SHAPES) * len(COLORS)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range [0, {self.num_examples})")
    s = self.image_size
    u = hash_uniform(self.seed, self._tag, 11, index, n=24)
    two = self.max_shapes == 2 and u[0] < 0.5
    objs = []
    for k in range(2 if two else 1):
      v = u[1 + 4 * k: 5 + 4 * k]
      objs.append({"shape": int(v[0] * len(SHAPES)),
                   "color": int(v[1] * len(COLORS)),
                   "size": int(v[2] * len(SIZES))})
    if two and objs[1]["color"] == objs[0]["color"]:
      objs[1]["color"] = (objs[1]["color"] + 1 + int(u[9] * 5)) % len(COLORS)
    radius = [s * SIZE_RADIUS[o["size"]] for o in objs]
    relation = int(u[10] * len(RELATIONS)) if two else -1
    img = _background(u[11:18], s)
    if not two:
      r = radius[0]
      centers = [(r + u[18] * (s - 2 * r), r + u[19] * (s - 2 * r))]
    else:
      # Slots along the relation's axis; the first object goes in the slot
      # the relation names (e.g. "above" -> top half).
      rel = RELATIONS[relation]
      first_low = rel in ("left of", "above")
      half = s / 2.0
      along = []
      for k, r in enumerate(radius):
        low = first_low if k == 0 else not first_low
        lo, hi = (r, half - r) if low else (half + r, s - r)
        along.append(lo + u[18 + k] * max(hi - lo, 0.0))
      across = s / 2.0 + (u[20] - 0.5) * 0.2 * s
      jitter = [(u[21 + k] - 0.5) * 0.15 * s for k in range(2)]
      horiz = rel in ("left of", "right of")
      centers = [((along[k], across + jitter[k]) if horiz else
                  (across + jitter[k], along[k])) for k in range(2)]
    for o, (cx, cy), r in zip(objs, centers, radius):
      m = shape_mask(o["shape"], cx, cy, r, s)
      img[m] = COLOR_RGB[o["color"]]
    a = objs[0]
    b = objs[1] if two else {"shape": -1, "color": -1, "size": -1}
    return {
        "image": np.clip(img, 0, 255).astype(np.uint8),
        "caption": caption_for(objs, relation),
        "shape": a["shape"], "color": a["color"], "size": a["size"],
        "label": a["shape"] * len(COLORS) + a["color"],
        "num_shapes": len(objs), "relation": relation,
        "shape2": b["shape"], "color2": b["color"], "size2": b["size"],
    }


class Classes(ShapesCaptions):
  """One shape per image; ``label = shape * len(COLORS) + color`` (30)."""

  def __init__(self, num_examples: int, image_size: int = 32, seed: int = 0,
               split: str = "train"):
    super().__init__(num_examples, image_size, seed, split, max_shapes=1)


def _palette(t: np.ndarray, p: np.ndarray) -> np.ndarray:
  """Cosine colour map a + b cos(2 pi (c t + d)); t [H, W] -> [H, W, 3]."""
  a, b = 0.5 + 0.2 * (p[0:3] - 0.5), 0.3 + 0.2 * p[3:6]
  c, d = 0.2 + 0.6 * p[6:9], p[9:12]
  return a + b * np.cos(6.2832 * (c * t[..., None] + d))


class Textures:
  """Shader-like procedural images (a Shaders21k stand-in).

  Each image is one of three programs -- a sinusoid mixture, a plasma
  (multi-octave sum of rotated sinusoids, fractal-noise like) or a domain-
  warped radial/spiral pattern -- mapped through a random cosine palette.
  Record: {"image": uint8[S, S, 3], "program": int}.
  """

  num_programs = 3

  def __init__(self, num_examples: int, image_size: int = 32, seed: int = 0,
               split: str = "train"):
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.split = split
    self._tag = _split_tag(split)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range [0, {self.num_examples})")
    u = hash_uniform(self.seed, self._tag, 22, index, n=64)
    x, y = _grid(self.image_size)
    x, y = x / self.image_size, y / self.image_size  # in [0, 1]
    program = int(u[0] * self.num_programs)
    if program == 0:  # sinusoid mixture
      t = np.zeros((self.image_size, self.image_size), np.float32)
      for k in range(4):
        f = 2.0 + 10.0 * u[1 + 3 * k]
        ang = 6.2832 * u[2 + 3 * k]
        t = t + np.sin(f * (np.cos(ang) * x + np.sin(ang) * y) * 3.1416
                       + 6.28 * u[3 + 3 * k])
      t = t / 4.0
    elif program == 1:  # plasma / fBm-like
      t = np.zeros((self.image_size, self.image_size), np.float32)
      amp, f = 1.0, 1.0 + 1.5 * u[1]
      for k in range(4):
        ang = 6.2832 * u[2 + 2 * k]
        t = t + amp * np.sin(f * 6.2832 * (np.cos(ang) * x + np.sin(ang) * y)
                             + 6.28 * u[3 + 2 * k] + 1.2 * t)
        amp, f = amp * 0.6, f * 1.7
      t = t / 2.2
    else:  # warped radial / spiral
      cx, cy = 0.2 + 0.6 * u[1], 0.2 + 0.6 * u[2]
      dx, dy = x - cx, y - cy
      rad = np.sqrt(dx * dx + dy * dy)
      ang = np.arctan2(dy, dx)
      arms = 1 + int(u[3] * 6)
      t = np.sin((4.0 + 14.0 * u[4]) * rad + arms * ang
                 + 3.0 * u[5] * np.sin(8.0 * u[6] * (x + y)))
    col = _palette(t, u[20:32])
    return {"image": (np.clip(col, 0.0, 1.0) * 255).astype(np.uint8),
            "program": program}


class Identities:
  """User-partitioned synthetic identities (a DigiFace stand-in).

  Identity ``g`` is a random 16x16 stroke glyph, deterministic in (seed,
  first_identity + g). Each image draws its own stroke colour (a nuisance,
  like lighting: a per-identity colour would let a client's few-way local
  softmax separate its identities by colour alone and teach the backbone
  nothing that transfers) and applies a random shift, stroke noise (dropped
  and spurious pixels), brightness jitter and a random background level.
  Layout is identity-major: example ``i = g * images_per_identity + j``;
  with one identity per user ``user == identity``, so ``user_indices(u)``
  is arithmetic, O(images).
  Use a different ``first_identity`` for disjoint (held-out) identities.

  Record: {"image": uint8[S, S, 3], "identity": int, "user": int}
  (``identity`` is local, in [0, num_identities)).
  """

  def __init__(self, num_identities: int, images_per_identity: int,
               image_size: int = 32, seed: int = 0, split: str = "train",
               first_identity: int = 0):
    self.num_identities = int(num_identities)
    self.images_per_identity = int(images_per_identity)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.split = split
    self.first_identity = int(first_identity)
    self._tag = _split_tag(split)

  def __len__(self) -> int:
    return self.num_identities * self.images_per_identity

  @property
  def num_users(self) -> int:
    return self.num_identities

  def user_indices(self, user: int) -> np.ndarray:
    """int64[images_per_identity] example indices of ``user``."""
    if not 0 <= user < self.num_users:
      raise IndexError(f"user {user} out of range [0, {self.num_users})")
    k = self.images_per_identity
    return np.arange(user * k, (user + 1) * k, dtype=np.int64)

  def prototype(self, identity: int) -> np.ndarray:
    """bool[16, 16] glyph of a local identity."""
    gid = self.first_identity + int(identity)
    u = hash_uniform(self.seed, 33, gid, n=64)
    glyph = np.zeros((16, 16), bool)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    n_strokes = 3 + int(u[0] * 3)
    for k in range(n_strokes):
      p0 = 2 + 12 * u[1 + 4 * k: 3 + 4 * k]
      p1 = 2 + 12 * u[3 + 4 * k: 5 + 4 * k]
      pts = np.round(p0 + t * (p1 - p0)).astype(int)
      glyph[pts[:, 1], pts[:, 0]] = True
    glyph |= np.roll(glyph, 1, axis=1)  # 2-px strokes
    return glyph

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    identity = index // self.images_per_identity
    glyph = self.prototype(identity)
    u = hash_uniform(self.seed, self._tag, 44, self.first_identity + identity,
                     index % self.images_per_identity, n=16 + 256)
    noise = u[16:].reshape(16, 16)
    g = (glyph & (noise > 0.1)) | (noise < 0.015)
    s = self.image_size
    rows = (np.arange(s) * 16) // s
    big = g[rows][:, rows]
    shift = s // 8
    dy = int(u[0] * (2 * shift + 1)) - shift
    dx = int(u[1] * (2 * shift + 1)) - shift
    big = np.roll(big, (dy, dx), axis=(0, 1))
    bright = 0.7 + 0.6 * u[2]
    bg = 20 + 60 * u[3]
    img = np.full((s, s, 3), bg, np.float32)
    colour = 60 + 195 * u[4:7]
    img[big] = colour * bright
    return {"image": np.clip(img, 0, 255).astype(np.uint8),
            "identity": identity, "user": identity}
