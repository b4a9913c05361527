"""Metric files: CSV round trip; bucket workdirs keep metrics local; no
wall-clock time per row; the progress bar shows private values only when
asked."""

import csv
import glob
import os
import struct

from tensorboardX.proto import event_pb2

from configs import dp_linear
from dpjax import recipes
from dpjax.train import metrics


def test_csv_round_trip(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), total_steps=2)
  w.write(1, {"private/loss": 2.0, "epsilon": 0.5})
  w.write(2, {"private/loss": 1.5, "epsilon": 0.7})
  w.close()
  got = metrics.read_csv(str(tmp_path))
  assert got == {"private/loss": [(1, 2.0), (2, 1.5)],
                 "epsilon": [(1, 0.5), (2, 0.7)]}
  assert (tmp_path / "tensorboard").is_dir()


def test_bucket_workdirs_keep_metrics_local():
  assert metrics.local_dir("runs/run") == "runs/run"
  assert metrics.local_dir("gs://bucket/run") == "runs/metrics/bucket/run"


def _events(workdir) -> list[event_pb2.Event]:
  """The events of tensorboard/ (TFRecord framing: length, crc, data, crc)."""
  out = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "*")):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      n, = struct.unpack("<Q", data[i:i + 8])
      out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
      i += 16 + n
  return out


def test_no_wall_clock_time_per_row(tmp_path, monkeypatch):
  """A private step's duration tracks its realised batch size, so neither
  file records when each row was written."""
  clock = iter(range(1000, 2000, 7))
  monkeypatch.setattr(metrics.time, "time", lambda: float(next(clock)))
  w = metrics.MetricWriter(str(tmp_path), total_steps=3)
  for step in (1, 2, 3):
    w.write(step, {"private/loss": 1.0 / step, "epsilon": 0.1 * step})
  w.close()
  with open(tmp_path / "metrics.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["step", "name", "value"]
  assert all(len(r) == 3 for r in rows)
  scalars = [e for e in _events(str(tmp_path)) if e.summary.value]
  assert len(scalars) == 6
  assert len({e.wall_time for e in scalars}) == 1  # The writer's start.


def test_appends_to_an_older_file_with_a_time_column(tmp_path):
  (tmp_path / "metrics.csv").write_text(
      "step,name,value,time\n1,epsilon,0.5,1700000000.5\n")
  w = metrics.MetricWriter(str(tmp_path), total_steps=2, initial_step=1)
  w.write(2, {"epsilon": 0.7})
  w.close()
  assert metrics.read_csv(str(tmp_path)) == {"epsilon": [(1, 0.5), (2, 0.7)]}
  rows = list(csv.reader(open(tmp_path / "metrics.csv", newline="")))
  assert rows[-1] == ["2", "epsilon", "0.7", ""]


def test_progress_bar_hides_private_values_unless_asked(tmp_path):
  values = {"private/loss": 2.345, "nonprivate/loss": 1.25, "eps": 0.5,
            "ex/s": 100.0}
  for show, want in ((False, ["nonprivate/loss", "eps", "ex/s"]),
                     (True, list(values))):
    w = metrics.MetricWriter(str(tmp_path / str(show)), total_steps=2,
                             show_private=show)
    w.progress(1, values)
    shown = w._bar.postfix  # pylint: disable=protected-access
    assert [kv.split("=")[0] for kv in shown.split(", ")] == want
    assert ("2.345" in shown) == show
    w.close()


def test_a_run_shows_no_private_loss_in_its_progress_bar(tmp_path, capsys):
  c = dp_linear.get_config()
  c.train.update(steps=2, log_every=1)
  c.evals.accuracy.log_steps = 0
  c.privacy.update(noise_seed=0, sampling_seed=0)
  assert not c.train.progress_private  # The default.
  recipes.run(c, str(tmp_path / "default"))
  bar = capsys.readouterr().err
  assert "eps=" in bar and "ex/s=" in bar
  assert "loss" not in bar
  c.train.progress_private = True
  recipes.run(c, str(tmp_path / "asked"))
  assert "private/loss=" in capsys.readouterr().err
