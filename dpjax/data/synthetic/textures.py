"""Shader-like procedural images (a Shaders21k stand-in; ViP's warm start)."""

from typing import Any

import numpy as np

from dpjax.data.synthetic import common


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
    self._tag = common.split_tag(split)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range [0, {self.num_examples})")
    u = common.hash_uniform(self.seed, self._tag, 22, index, n=64)
    x, y = common.grid(self.image_size)
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
