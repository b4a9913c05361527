"""(Re)generates the tiny committed test fixtures under tests/fixtures/.

  python tools/make_fixtures.py [--out tests/fixtures]

* ``tfds/dpjax_tiny_captions/1.0.0/``: a prepared TFDS dataset in ArrayRecord
  format (train: 6, test: 2 examples of 16x16 images + captions + labels),
  built by TFDS itself *without TensorFlow*: images are handed to TFDS as
  PNG bytes, which ``tfds.features.Image`` stores as-is (only encoding numpy
  arrays needs TensorFlow).
* ``folder/``: 4 PNGs + ``captions.jsonl``.
* ``arrayrecord/tiny-00000-of-00001.array_record``: 4 msgpack records.

All content comes from ``synthetic.ShapesCaptions(seed=123, image_size=16)``.
"""

import argparse
import json
import os
import shutil

from dpjax.data import synthetic
from dpjax.prepare import records as records_lib

TFDS_NAME = "dpjax_tiny_captions"
_SEED = 123


def _examples(split: str, n: int):
  ds = synthetic.ShapesCaptions(n, image_size=16, seed=_SEED, split=split)
  return [ds[i] for i in range(n)]


def build_tfds(data_dir: str) -> None:
  """Prepares the TFDS fixture under ``data_dir`` (no TensorFlow needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class DpjaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """8 synthetic captioned 16x16 images."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(16, 16, 3)),
              "caption": tfds.features.Text(),
              "label": tfds.features.ClassLabel(
                  num_classes=len(synthetic.SHAPES) * len(synthetic.COLORS)),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples("train", 6),
              "test": self._generate_examples("test", 2)}

    def _generate_examples(self, split, n):
      for i, r in enumerate(_examples(split, n)):
        yield i, {"image": records_lib.encode_image(r["image"]),
                  "caption": r["caption"], "label": r["label"]}

  builder = DpjaxTinyCaptions(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  shutil.rmtree(os.path.join(data_dir, "downloads"), ignore_errors=True)


def build_folder(directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "captions.jsonl"), "w") as f:
    for i, r in enumerate(_examples("folder", 4)):
      name = f"img{i}.png"
      with open(os.path.join(directory, name), "wb") as img:
        img.write(records_lib.encode_image(r["image"]))
      f.write(json.dumps({"file": name, "caption": r["caption"],
                          "label": r["label"]}) + "\n")


def build_arrayrecord(directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  recs = [{"image": r["image"], "caption": r["caption"], "label": r["label"]}
          for r in _examples("arrayrecord", 4)]
  records_lib.write_arrayrecord(
      os.path.join(directory, "tiny-00000-of-00001.array_record"), recs)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="tests/fixtures")
  out = parser.parse_args().out
  for sub in ("tfds", "folder", "arrayrecord"):
    shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
  build_tfds(os.path.join(out, "tfds"))
  build_folder(os.path.join(out, "folder"))
  build_arrayrecord(os.path.join(out, "arrayrecord"))


if __name__ == "__main__":
  main()
