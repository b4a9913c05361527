"""Run metrics: CSV + TensorBoard event files + a progress bar; process 0 only.

Metrics computed on private data (training loss, gradient norms, clipped
fraction) are NOT differentially private: they are written under the
"private/" prefix so nobody mistakes them for released statistics. Only
aggregates are ever passed here, never per-example values.
"""

import csv
import os
import time
from typing import Mapping

from absl import logging
import jax
import tqdm
from tensorboardX import SummaryWriter


def local_dir(workdir: str) -> str:
  """Where metrics go: the workdir, or for a bucket workdir (gs://b/run),
  ./runs/metrics/b/run (CSV appends and TensorBoard need a local file
  system; checkpoints and results.json still go to the bucket)."""
  if "://" not in workdir:
    return workdir
  local = os.path.join("runs", "metrics", workdir.split("://", 1)[1])
  logging.info("metrics of %s are written locally to %s", workdir, local)
  return local


class MetricWriter:
  """Writes scalars to <workdir>/metrics.csv (long format) and TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    workdir = local_dir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.csv")
    new = not os.path.exists(path)
    self._csv_file = open(path, "a", newline="")
    self._csv = csv.writer(self._csv_file)
    if new:
      self._csv.writerow(["step", "name", "value", "time"])
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step,
                          dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, scalars: Mapping[str, float]):
    if not self._active:
      return
    now = time.time()
    for name, value in scalars.items():
      value = float(value)
      self._csv.writerow([step, name, value, now])
      self._tb.add_scalar(name, value, step)
    self._csv_file.flush()

  def progress(self, step: int, postfix: Mapping[str, float]):
    if not self._active:
      return
    self._bar.n = step
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()},
                          refresh=True)

  def close(self):
    if self._active:
      self._bar.close()
      self._tb.close()
      self._csv_file.close()


def read_csv(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads metrics.csv back into {name: [(step, value), ...]} (notebooks)."""
  out: dict[str, list[tuple[int, float]]] = {}
  with open(os.path.join(local_dir(workdir), "metrics.csv")) as f:
    for row in csv.DictReader(f):
      out.setdefault(row["name"], []).append(
          (int(row["step"]), float(row["value"])))
  return out
