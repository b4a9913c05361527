"""Test data with bad records: a folder and an ArrayRecord file.

Both hold ``n`` captioned 16x16 shapes images (``synthetic.ShapesCaptions``)
of which four are bad, the four kinds a real crawl has:

* record 0: a corrupt image (not an image at all; also the record a
  pipeline would use as its padding template),
* record 3: a truncated image (first half of a valid PNG),
* record 5: a missing image (folder: the index names a file that does not
  exist; ArrayRecord: the record has no image field),
* record 8: an empty caption.
"""

import json
import os

from dpjax.data import synthetic
from dpjax.prepare import records as records_lib

CORRUPT, TRUNCATED, MISSING, EMPTY_CAPTION = 0, 3, 5, 8
BAD = (CORRUPT, TRUNCATED, MISSING, EMPTY_CAPTION)
# Why each is bad (dpjax.data.BAD_REASONS), by source kind.
FOLDER_REASONS = {CORRUPT: "decode", TRUNCATED: "decode",
                  MISSING: "missing_file", EMPTY_CAPTION: "empty_caption"}
ARRAYRECORD_REASONS = {**FOLDER_REASONS, MISSING: "missing_field"}


def records(n: int) -> list[dict]:
  ds = synthetic.ShapesCaptions(n, image_size=16, seed=11, split="bad")
  return [ds[i] for i in range(n)]


def _image_bytes(i: int, image) -> bytes | None:
  png = records_lib.encode_image(image)
  if i == CORRUPT:
    return b"this is not a PNG"
  if i == TRUNCATED:
    return png[:len(png) // 2]
  return png


def file_name(i: int) -> str:
  return f"img{i:03d}.png"


def make_folder(directory: str, n: int = 12) -> str:
  """Writes the folder; returns its ``data.source`` spec."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "captions.jsonl"), "w") as f:
    for i, r in enumerate(records(n)):
      if i != MISSING:
        with open(os.path.join(directory, file_name(i)), "wb") as img:
          img.write(_image_bytes(i, r["image"]))
      caption = "" if i == EMPTY_CAPTION else r["caption"]
      f.write(json.dumps({"file": file_name(i), "caption": caption,
                          "label": r["label"]}) + "\n")
  return f"folder:{directory}"


def make_arrayrecord(directory: str, n: int = 12) -> str:
  """Writes one ArrayRecord file; returns its ``data.source`` spec."""
  os.makedirs(directory, exist_ok=True)
  out = []
  for i, r in enumerate(records(n)):
    rec = {"caption": "" if i == EMPTY_CAPTION else r["caption"],
           "label": r["label"]}
    if i != MISSING:
      rec["image"] = _image_bytes(i, r["image"])
    out.append(rec)
  path = os.path.join(directory, "bad-00000-of-00001.array_record")
  records_lib.write_arrayrecord(path, out)
  return f"arrayrecord:{path}"


def make(kind: str, directory: str, n: int = 12) -> tuple[str, dict]:
  """(data.source spec, {bad index: reason}) of a "folder" or
  "arrayrecord" source."""
  if kind == "folder":
    return make_folder(directory, n), FOLDER_REASONS
  return make_arrayrecord(directory, n), ARRAYRECORD_REASONS
