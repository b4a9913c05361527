"""Issue #20's "done when": img2dataset-style shards -> prepare -> DP-Cap.

Two webdataset shards with exact duplicates (byte copies and a re-encoding
with the same pixels), a corrupt JPEG and a sample without a caption go
through ``dpjax.prepare``; the test checks N, the dedup counts and the
skipped-record report, then trains 3 Poisson-sampled DP steps of DP-Cap on
the output through ``data.source="arrayrecord:<dir>"``.
"""

import io
import json

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import dpcap as dpcap_config
from dpjax import recipes
from dpjax.data import sources
from dpjax.data import transforms
from dpjax.prepare import run
from dpjax.prepare import stage
from tests.prepare import fake_inputs

_DISTINCT = 54  # Distinct usable pictures; 32 x 32 JPEGs.


def evals_off(c: ml_collections.ConfigDict) -> None:
  """No evaluator, for either shape of ``config.evals``: the big_vision-style
  ``{name: {type, log_steps, ...}}`` dict is emptied; boolean flags and
  counts (the older shape) are cleared."""
  if all(isinstance(v, ml_collections.ConfigDict) for v in c.evals.values()):
    c.evals = ml_collections.ConfigDict()
    return
  for k, v in c.evals.items():
    if isinstance(v, bool) or k == "captions":
      c.evals[k] = type(v)(0)


def _shards(path) -> None:
  """00000.tar: pictures 0-29, a corrupt JPEG, one without a caption;
  00001.tar: pictures 30-53, byte copies of 3 and 10, and picture 5
  re-encoded as PNG (other bytes, the same decoded pixels)."""
  jpg = [fake_inputs.encode(fake_inputs.pixels(i, (32, 32)), "JPEG",
                            quality=90) for i in range(_DISTINCT)]
  sample = lambda i, key: (key, {"jpg": jpg[i],
                                 "txt": f"photo {i}".encode(),
                                 "json": json.dumps({"i": i}).encode()})
  fake_inputs.tar(path / "00000.tar", [
      sample(i, f"0{i:04d}") for i in range(30)] + [
          ("0corrupt", {"jpg": jpg[0][:200], "txt": b"cut short"}),
          ("0nocaption", {"jpg": jpg[1]})])
  same_pixels = fake_inputs.encode(np.asarray(Image.open(io.BytesIO(jpg[5]))))
  fake_inputs.tar(path / "00001.tar", [
      sample(i, f"1{i:04d}") for i in range(30, _DISTINCT)] + [
          ("1copy3", {"jpg": jpg[3], "txt": b"copy"}),
          ("1copy10", {"jpg": jpg[10], "txt": b"copy"}),
          ("1png5", {"png": same_pixels, "txt": b"re-encoded"})])


def _config(out: str, n: int) -> ml_collections.ConfigDict:
  """:tiny shrunk to 3 DP steps of batch ~16 on the prepared directory."""
  c = dpcap_config.get_config("tiny")
  c.model.update(stem="patch", encoder_depth=1, decoder_depth=1)
  c.data.update(source=f"arrayrecord:{out}", num_examples=n,
                tokenizer="bytes", max_caption_len=12, eval_num_examples=8)
  c.train.update(steps=3, batch_size=16, microbatch_size=16, log_every=1,
                 warmup_steps=1, checkpoint_every=100)
  c.privacy.update(noise_multiplier=1.0, sampling="poisson")
  evals_off(c)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("e2e")
  _shards(tmp)
  out = tmp / "out"
  m = run.prepare(str(tmp), "webdataset", str(out),
                  stage.Options(), records_per_shard=20)
  return out, m


def test_converter_counts_and_reports_skipped_records(prepared):
  out, m = prepared
  assert m["source"]["records_read"] == _DISTINCT + 5
  assert m["num_examples"] == _DISTINCT
  assert [s["num_examples"] for s in m["shards"]] == [20, 20, 14]
  assert m["dedup"]["exact_duplicates"] == 3
  assert m["dropped"] == {"corrupt_image": 1, "exact_duplicate": 3,
                          "missing_caption": 1}
  with open(out / "dropped.jsonl") as f:
    report = {d["key"]: d for d in map(json.loads, f)}
  assert {k: (d["reason"], d.get("kept_index")) for k, d in report.items()
          } == {"0corrupt": ("corrupt_image", None),
                "0nocaption": ("missing_caption", None),
                "1copy3": ("exact_duplicate", 3),
                "1copy10": ("exact_duplicate", 10),
                "1png5": ("exact_duplicate", 5)}
  src = sources.make_source(f"arrayrecord:{out}",
                            expect_num_examples=_DISTINCT)
  assert [src[i]["caption"] for i in (0, 5, 53)] == [
      "photo 0", "photo 5", "photo 53"]
  assert transforms.decode_image(src[53]["image"]).shape == (32, 32, 3)


def test_three_poisson_dp_steps_of_dpcap_on_the_output(prepared, tmp_path):
  out, m = prepared
  results = recipes.run(_config(str(out), m["num_examples"]),
                        str(tmp_path / "run"))
  assert results["step"] == 3
  assert results["dp/num_examples"] == _DISTINCT
  assert results["dp/sampling_rate"] == pytest.approx(16 / _DISTINCT)
  assert results["secret_sampling"] and 0 < results["epsilon"] < np.inf
