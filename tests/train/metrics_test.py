"""Metric files: CSV round trip; bucket workdirs keep metrics local."""

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
  assert metrics.local_dir("/tmp/run") == "/tmp/run"
  assert metrics.local_dir("gs://bucket/run") == "runs/metrics/bucket/run"
