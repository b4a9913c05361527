"""Run metrics: CSV + TensorBoard event files + a progress bar; process 0 only.

Metrics computed on private data (training loss, gradient norms, clipped
fraction) are NOT differentially private: they are written under the
"private/" prefix so nobody mistakes them for released statistics. Only
aggregates are ever passed here, never per-example values.

metrics.csv and tensorboard/ are the operator's (PRIVACY.md): they hold the
private/ values. Neither records a wall-clock time per row (a private
step's duration tracks its realised batch size): metrics.csv has no time
column, and every TensorBoard event carries the writer's start time. The
progress bar shows no private/ value unless asked (`show_private`,
config.train.progress_private).
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


COLUMNS = ("step", "name", "value")


def is_private(name: str) -> bool:
  """Whether a metric name marks a value computed on private data."""
  return name.startswith("private/")


def _header(path: str) -> list[str] | None:
  """The header of an existing metrics.csv (None if there is none)."""
  if not os.path.exists(path) or not os.path.getsize(path):
    return None
  with open(path, newline="") as f:
    return next(csv.reader(f))


class MetricWriter:
  """Writes scalars to <workdir>/metrics.csv (long format) and TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               show_private: bool = False):
    self._active = jax.process_index() == 0
    self._show_private = show_private
    if not self._active:
      return
    workdir = local_dir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.csv")
    header = _header(path)
    self._csv_file = open(path, "a", newline="")
    self._csv = csv.writer(self._csv_file)
    if header is None:
      header = list(COLUMNS)
      self._csv.writerow(header)
    # A file from an older version has a time column: left empty.
    self._pad = [""] * (len(header) - len(COLUMNS))
    self._walltime = time.time()  # Every TensorBoard event's wall time.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step,
                          dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, scalars: Mapping[str, float]):
    if not self._active:
      return
    for name, value in scalars.items():
      value = float(value)
      self._csv.writerow([step, name, value] + self._pad)
      self._tb.add_scalar(name, value, step, walltime=self._walltime)
    self._csv_file.flush()

  def progress(self, step: int, postfix: Mapping[str, float]):
    """Moves the bar to `step` and shows `postfix`, except its "private/"
    values unless the writer was made with `show_private`."""
    if not self._active:
      return
    self._bar.n = step
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()
                           if self._show_private or not is_private(k)},
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
