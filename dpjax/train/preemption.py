"""SIGTERM at any moment leaves a resumable workdir (the loop's handler).

Preemptible machines (TPU/GPU spot VMs, SLURM) send SIGTERM and kill the
process a little later. Training finishes its step and checkpoints; start-
up and evaluation, which write nothing durable, stop at once.
"""

import contextlib
import signal

from absl import logging
import jax
import numpy as np


class Preempted(Exception):
  """SIGTERM arrived where the run can stop at once (start-up, the final
  evaluation): nothing durable is being written there."""


class Preemption:
  """SIGTERM handling for the whole run.

  Inside `critical()` (training steps, checkpoint writes, results.json) it
  only sets a flag, checked after every step on all processes; elsewhere
  (start-up, evaluation) it raises `Preempted` at once. Either way the
  workdir stays resumable.
  """

  def __init__(self):
    self.requested = False
    self._critical = 0
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. inside a notebook thread).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    if not self._critical:
      raise Preempted()
    logging.warning("SIGTERM: finishing this step, checkpointing, exiting.")

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  @contextlib.contextmanager
  def critical(self):
    """A region that must complete (a SIGTERM in it is deferred)."""
    self._critical += 1
    try:
      yield
    finally:
      self._critical -= 1
    if self.requested and not self._critical:
      raise Preempted()

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))
