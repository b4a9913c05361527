"""Bad records in the data layer: start-up validation, zero rows, the tally.

The folder and ArrayRecord sources of ``bad_data`` hold a corrupt image, a
truncated image, a missing image and an empty caption.
"""

import json
import pickle
import warnings

import numpy as np
import pytest

from dpjax import data
from dpjax.data import bad_records
from dpjax.data import pipeline
from dpjax.data import sources
from dpjax.data import synthetic
from dpjax.data import tokenizer
from dpjax.data import transforms
from dpjax.privacy import sampling
from tests.data import bad_data

KINDS = ("folder", "arrayrecord")
FIELDS = {"image": "image", "caption": "caption"}


def _source(kind, tmp_path, n=12):
  spec, reasons = bad_data.make(kind, str(tmp_path), n)
  return sources.make_source(spec, fields=FIELDS), reasons


def _transforms():
  return transforms.image_pipeline(8, tokenizer=tokenizer.shapes_tokenizer(),
                                   max_len=12)


@pytest.mark.parametrize("kind", KINDS)
def test_validation_lists_every_problem_in_one_error(kind, tmp_path):
  src, reasons = _source(kind, tmp_path)
  with pytest.raises(data.DataValidationError) as err:
    bad_records.validate_phases([("dp", src, _transforms())])
  msg = str(err.value)
  assert "4 of 12 records" in msg and "decode: 2" in msg
  listed = [line for line in msg.splitlines() if line.startswith("  record ")]
  assert len(listed) == 4
  for i, reason in reasons.items():
    line, = [x for x in listed if x.startswith(f"  record {i}")]
    assert reason in line
    if kind == "folder":
      assert bad_data.file_name(i) in line
  assert "0x" not in msg  # no buffer addresses from Pillow.
  assert "--config.data.on_bad_record=skip" in msg  # the fix.
  assert "captions.jsonl" in msg


@pytest.mark.parametrize("kind", KINDS)
def test_skip_mode_and_size_threshold(kind, tmp_path):
  src, reasons = _source(kind, tmp_path)
  ts = _transforms()
  found = bad_records.validate_phases([("dp", src, ts)], on_bad_record="skip")
  assert {i: data.BAD_REASONS[c - 1] for i, c, _ in found["dp"]} == reasons
  # Larger than the threshold: never read in full, except a folder with
  # on_bad_record="error" (cheap to check, and the default).
  if kind == "folder":
    with pytest.raises(data.DataValidationError):
      bad_records.validate_phases([("dp", src, ts)], max_records=5)
  else:
    assert bad_records.validate_phases([("dp", src, ts)], max_records=5) == {}
  assert bad_records.validate_phases([("dp", src, ts)], on_bad_record="skip",
                                  max_records=5) == {}
  # Generated data is never read (this would take hours).
  huge = synthetic.ShapesCaptions(10**9, image_size=8)
  assert bad_records.validate_phases([("x", huge, ts)], max_records=10**10) == {}
  with pytest.raises(ValueError, match="config.data.on_bad_record='drop'"):
    bad_records.validate_phases([("dp", src, ts)], on_bad_record="drop")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_rows_are_padding_rows_and_reported_in_the_element(kind,
                                                               tmp_path):
  src, reasons = _source(kind, tmp_path)
  ts = _transforms()
  it = pipeline.poisson_batches(src, sampling_rate=1.0, global_microbatch=8,
                                seed=3, num_steps=2, transforms=ts,
                                process_index=0, process_count=1)
  rows = pipeline.RowLoader(src, tuple(ts), 3)
  for el in it:
    assert el["batch_size"] == 12  # the realised size (and N) unchanged.
    assert el["mask"].shape == el["bad_index"].shape == (2, 8)
    mask, bad = el["mask"].reshape(-1), el["bad_index"].reshape(-1)
    why = el["bad_reason"].reshape(-1)
    for i in range(12):
      assert mask[i] == (0.0 if i in reasons else 1.0)
      assert bad[i] == (i if i in reasons else -1)
      assert why[i] == (data.reason_code(reasons[i]) if i in reasons else 0)
    assert not mask[12:].any() and (bad[12:] == -1).all()
    images = el["example"]["image"].reshape(16, 8, 8, 3)
    # Bad rows hold the padding template: record 1 (record 0 is corrupt).
    template = rows.load(1, 0)["image"]
    for i in list(reasons) + [12, 15]:
      np.testing.assert_array_equal(images[i], template)
    np.testing.assert_array_equal(images[2],
                                  rows.load(2, int(el["step"]))["image"])
    rng = el["example"]["rng"].reshape(16, 2)
    assert not rng[list(reasons)].any() and rng[2].any()


def test_poisson_rows_are_the_sample_minus_the_bad_records(tmp_path):
  src, reasons = _source("folder", tmp_path, n=40)
  it = pipeline.poisson_batches(src, sampling_rate=0.3, global_microbatch=4,
                                seed=5, num_steps=6, transforms=_transforms(),
                                process_index=0, process_count=1)
  tally = bad_records.BadRecordTally()
  draws = dict.fromkeys(reasons, 0)
  for el in it:
    step = int(el["step"])
    want = sampling.sample_indices(5, step, 40, 0.3)
    x_bad = el["bad_index"].reshape(-1)
    assert sorted(x_bad[x_bad >= 0]) == sorted(set(want) & set(reasons))
    assert el["mask"].sum() == len(set(want) - set(reasons))
    for i in set(want) & set(reasons):
      draws[i] += 1
    tally.add("dp", el)
  want_state = [[i, data.reason_code(reasons[i]), n]
                for i, n in sorted(draws.items()) if n]
  assert tally.state() == ({"dp": want_state} if want_state else {})
  assert tally.num_draws() == sum(draws.values())


def test_template_and_a_source_where_nothing_loads(tmp_path):
  src, _ = _source("folder", tmp_path)
  # A config error (every record lacks the kept field) is not "bad records".
  ts = _transforms()[:-1] + [transforms.Keep(["image", "no_such_field"])]
  it = pipeline.poisson_batches(src, sampling_rate=0.5, global_microbatch=8,
                                seed=0, num_steps=1, transforms=ts,
                                process_index=0, process_count=1)
  with pytest.raises(data.DataValidationError,
                     match="none of the first 12 records.*no_such_field"):
    next(it)


class _IndexSource:

  def __len__(self):
    return 10

  def __getitem__(self, i):
    return {"x": np.int64(i)}


def test_programming_errors_propagate_and_warnings_are_silenced():
  def fails(record):
    if record["x"] == 4:
      raise ValueError("a bug, not a bad record")
    return record

  it = pipeline.poisson_batches(_IndexSource(), sampling_rate=1.0,
                                global_microbatch=16, seed=0, num_steps=1,
                                transforms=[fails], process_index=0,
                                process_count=1)
  with pytest.raises(ValueError, match="a bug"):
    next(it)

  calls = []

  def warns(record):
    calls.append(int(record["x"]))
    if record["x"] == 4:
      warnings.warn("record 4 looks odd")
    return record

  it = pipeline.poisson_batches(_IndexSource(), sampling_rate=1.0,
                                global_microbatch=16, seed=0, num_steps=1,
                                transforms=[warns], process_index=0,
                                process_count=1)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    el = next(it)
  assert 4 in calls and not caught  # when it was drawn is not shown.
  assert el["mask"].sum() == 10


def test_tally_state_merge_and_report(tmp_path):
  src, reasons = _source("folder", tmp_path)
  el = {"bad_index": np.array([[0, -1, 5], [8, 0, -1]]),
        "bad_reason": np.array([[4, 0, 1], [5, 4, 0]], np.int8)}
  tally = bad_records.BadRecordTally()
  tally.add("dp", el)
  tally.add("dp", {"mask": np.ones(3)})  # elements without the leaves.
  state = json.loads(json.dumps(tally.state()))
  assert state == {"dp": [[0, 4, 2], [5, 1, 1], [8, 5, 1]]}
  again = bad_records.BadRecordTally.from_state(state).merge(tally)
  assert again.num_records() == 3 and again.num_draws() == 8
  assert bad_records.BadRecordTally.from_state(None).state() == {}
  assert tally.allgather(["dp"]).state() == tally.state()  # one process.
  report = json.loads(json.dumps(tally.report(
      [("dp", True, src), ("pretrain", False, src)])))
  assert "PRIVATE" in report["WARNING"]
  dp = report["phases"]["dp"]
  assert (dp["private"], dp["bad_records"], dp["bad_draws"]) == (True, 3, 4)
  assert dp["by_reason"] == {"decode": 1, "empty_caption": 1,
                             "missing_file": 1}
  assert dp["records"][0] == {"index": 0, "reason": "decode", "draws": 2,
                              "name": bad_data.file_name(0)}
  assert report["phases"]["pretrain"]["records"] == []


def test_transform_and_source_errors_are_bad_records(tmp_path):
  tok = tokenizer.shapes_tokenizer()
  tokenize = transforms.Tokenize(tok, 8)
  assert tokenize.map({"caption": "a red circle"})["tokens"][1] > 2
  for caption in ("", "   ", None):
    with pytest.raises(data.BadRecord) as err:
      tokenize.map({"caption": caption})
    assert err.value.reason == "empty_caption"
  assert transforms.Tokenize(tok, 8, allow_empty=True).map(
      {"caption": ""})["tokens"][2] == 0
  with pytest.raises(data.BadRecord, match="decode"):
    transforms.decode_image(b"")
  err = pickle.loads(pickle.dumps(data.BadRecord("read", "x.png: gone")))
  assert (err.reason, str(err)) == ("read", "x.png: gone")
  # An index line that is not JSON, or lacks "file", is a bad record of
  # the folder (it still counts in N), found with the others.
  directory = tmp_path / "f"
  bad_data.make_folder(str(directory), n=4)
  with open(directory / "captions.jsonl", "a") as f:
    f.write("{not json\n")
    f.write(json.dumps({"caption": "a red circle"}) + "\n")
  src = sources.make_source(f"folder:{directory}")
  assert len(src) == 6
  found = bad_records.find_bad_records(src, _transforms())
  assert [(i, data.BAD_REASONS[c - 1]) for i, c, _ in found] == [
      (0, "decode"), (3, "decode"), (4, "read"), (5, "missing_field")]
