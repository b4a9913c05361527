"""Coloured shapes with grammar captions (DP-Cap, ViP's private stage,
linear probes) and one-shape classes (DP continual pretraining)."""

from typing import Any

import numpy as np

from dpjax.data.synthetic import common

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


def shape_mask(shape: int, cx: float, cy: float, r: float,
               size: int) -> np.ndarray:
  """Boolean [size, size] mask of one shape centred at (cx, cy), radius r."""
  x, y = common.grid(size)
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


def zero_shot_prompts(template: str = ZERO_SHOT_TEMPLATE,
                      classes: tuple[str, ...] = SHAPES) -> list[str]:
  """Prompts for zero-shot classification, one per class (label order)."""
  return [template.format(c) for c in classes]


def _background(u: np.ndarray, size: int) -> np.ndarray:
  """Light, low-contrast textured background [size, size, 3] float32."""
  x, y = common.grid(size)
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
    self._tag = common.split_tag(split)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed}, "
            f"split={self.split!r})")

  @property
  def num_classes(self) -> int:
    return len(SHAPES) * len(COLORS)

  def record_keys(self) -> np.ndarray:
    """uint64[N]: record i's generator key, a hash of everything the record
    is a pure function of (seed, split, index, image size, max shapes).

    Equal keys mean equal records; distinct keys (distinct i, exactly)
    render distinct records (24 continuous draws each), so the key
    identifies the content and ``splits.public_private_split`` uses it
    instead of rendering every image (vectorized: ~20 ns per record).
    """
    return common.hash_u64(0x5EC0DE, self.seed, self._tag, self.image_size,
                           self.max_shapes,
                           indices=np.arange(self.num_examples))

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range [0, {self.num_examples})")
    s = self.image_size
    u = common.hash_uniform(self.seed, self._tag, 11, index, n=24)
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
