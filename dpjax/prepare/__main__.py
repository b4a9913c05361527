r"""Converts image(-text) data into ArrayRecord shards that dpjax trains on.

  python -m dpjax.prepare --input=/data/laion/ --format=webdataset \
      --output=/data/laion-ar --image_size=256 --jpeg_quality=90

Inputs (``readers``): img2dataset webdataset ``.tar`` shards, parquet with
image bytes, or an image folder with ``captions.jsonl`` / ``.csv``. Output:
``data-XXXXX-of-YYYYY.arrayrecord`` (msgpack records: "image" bytes, "key",
and "caption" / "user" / "label" when asked for), ``manifest.json``
(``dpjax.data.manifest``), ``dropped.jsonl`` (every input record not
written, with its reason; owner-only, 0600: derived from the private data)
and, user-keyed, ``users.jsonl`` (+ ``labels.npy``). Train on it with
``data.source="arrayrecord:<output>"``.

Passes: (1) stage every input shard in parallel: decode, drop unusable
records with a reason, hash, resize; (2) plan globally: exact (and near)
duplicates across ALL shards, keeping the first in input order; group by
user; cut into output shards; (3) write the output shards in parallel.
Both parallel passes skip units already done (rerun after an interruption
to resume); intermediate files live in ``<output>/_work`` until the
manifest is written. ``--runner=beam`` runs passes 1 and 3 as Apache Beam
pipelines (``pip install dpjax[beam]``; ``--beam_options`` e.g.
"--runner=DataflowRunner ..."; the output must then be a file system every
worker mounts); the plan runs in this process (vectorised, about 30 bytes
of memory per record).
"""

import os
import shlex
import sys
from typing import Sequence

from absl import app
from absl import flags

from dpjax.prepare import plan as prepare_plan
from dpjax.prepare import readers
from dpjax.prepare import run
from dpjax.prepare import stage as prepare_stage

_INPUT = flags.DEFINE_string("input", None, "Input directory or glob.")
_FORMAT = flags.DEFINE_enum("format", None, list(readers.FORMATS),
                            "Input format.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Resize the shorter side to this (never upscales) and "
    "re-encode as JPEG; 0 keeps the original bytes.")
_JPEG_QUALITY = flags.DEFINE_integer(
    "jpeg_quality", 0, "JPEG quality when re-encoding; > 0 also re-encodes "
    f"unresized images (0: {prepare_stage.DEFAULT_JPEG_QUALITY} if resized).")
_DEDUP = flags.DEFINE_enum("dedup", "exact", list(prepare_plan.DEDUP_MODES),
                           "Duplicate removal (a privacy measure: docs/data.md).")
_HAMMING = flags.DEFINE_integer(
    "hamming_threshold", 4, "--dedup=near: max differing dHash bits (of 64).")
_CAPTION_KEY = flags.DEFINE_string(
    "caption_key", "caption", "Input field holding the caption (webdataset: "
    "the .txt member is 'caption'); '' = no captions (image-only data).")
_USER_KEY = flags.DEFINE_string(
    "user_key", "", "Input field holding the user id: groups records by "
    "user (DP-FedEmb).")
_LABEL_KEY = flags.DEFINE_string("label_key", "",
                                 "Input field holding an integer label.")
_IMAGE_KEY = flags.DEFINE_string(
    "image_key", "", "Image member extension / column ('' = first found).")
_RUNNER = flags.DEFINE_enum("runner", "local", ["local", "beam"],
                            "Engine for the parallel passes.")
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_options", "", "Beam pipeline options (default: DirectRunner).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                    "Parallel worker processes.")
_RECORDS_PER_SHARD = flags.DEFINE_integer("records_per_shard", 10_000,
                                          "Records per output shard.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  opts = prepare_stage.Options(
      image_size=_IMAGE_SIZE.value, jpeg_quality=_JPEG_QUALITY.value,
      caption_key=_CAPTION_KEY.value, user_key=_USER_KEY.value,
      label_key=_LABEL_KEY.value, image_key=_IMAGE_KEY.value)
  command = "python -m dpjax.prepare " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  m = run.prepare(_INPUT.value, _FORMAT.value, _OUTPUT.value, opts,
                  dedup_mode=_DEDUP.value, hamming_threshold=_HAMMING.value,
                  runner=_RUNNER.value, num_workers=_NUM_WORKERS.value,
                  records_per_shard=_RECORDS_PER_SHARD.value,
                  beam_options=_BEAM_OPTIONS.value, command=command)
  print(f"{m['num_examples']} records in {len(m['shards'])} shards under "
        f"{_OUTPUT.value}; dropped {m['dropped']}. Train with "
        f"data.source='arrayrecord:{_OUTPUT.value}'.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "format", "output"])
  app.run(main)
