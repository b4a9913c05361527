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

# pylint: disable=g-importing-member
from dpjax.data.synthetic.canaries import noise_canaries
from dpjax.data.synthetic.identities import Identities
from dpjax.data.synthetic.shapes import Classes
from dpjax.data.synthetic.shapes import COLOR_RGB
from dpjax.data.synthetic.shapes import COLORS
from dpjax.data.synthetic.shapes import perturbed_captions
from dpjax.data.synthetic.shapes import RELATIONS
from dpjax.data.synthetic.shapes import SHAPES
from dpjax.data.synthetic.shapes import ShapesCaptions
from dpjax.data.synthetic.shapes import SIZES
from dpjax.data.synthetic.shapes import VOCAB_WORDS
from dpjax.data.synthetic.shapes import zero_shot_prompts
from dpjax.data.synthetic.textures import Textures
