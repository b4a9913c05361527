"""User-partitioned glyph identities (a DigiFace stand-in; DP-FedEmb)."""

from typing import Any

import numpy as np

from dpjax.data.synthetic import common


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
    self._tag = common.split_tag(split)

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
    u = common.hash_uniform(self.seed, 33, gid, n=64)
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
    u = common.hash_uniform(self.seed, self._tag, 44, self.first_identity + identity,
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
