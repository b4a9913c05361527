r"""dpjax entry point: `python -m dpjax.main --config=configs/dpcap.py:tiny`.

Flags: --config (an ml_collections config file with `get_config(arg)`; override
any field with e.g. --config.train.steps=10) and --workdir (checkpoints,
metrics, results; any path Orbax accepts, e.g. gs://bucket/run; rerunning the
same command resumes from it).

Multi-host: run the same command once per host (process). jax.distributed is
initialised when the environment says so: --coordinator_address (with
--num_processes and --process_id, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), a SLURM job with more than one task, a
TPU VM slice with more than one worker (TPU_WORKER_HOSTNAMES), or --multihost
(jax auto-detects the cluster: TPU VM metadata, SLURM, Open MPI, ...). See
launch/README.md.

Preemption: SIGTERM at any moment exits 0 with a resumable workdir: during
training it finishes the current step and checkpoints; during start-up or
the final evaluation it stops at once. The same command resumes the run
(and a finished run only re-does what is missing).

Output: a progress bar and a handful of lines. Other libraries' INFO logs
(Orbax, jax) and the full config are shown with --verbosity=1.

Errors a user fixes print one line on stderr and exit 2 (--traceback shows
the traceback instead): a bad command line or config (a config file that
does not exist, an unknown preset or config arg, a misspelled field with
ml_collections' "did you mean" hint, a value of the wrong type: caught where
the flags are parsed, `errors.flags_parser`), an invalid config field (the
message names the field, the value and the fix; a library's ValueError
about a value is one where the config is resolved), or bad data found by
start-up validation (every problem in one message; see docs/data.md).
"""

import logging as py_logging
import os
import signal
import sys
from typing import Mapping

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dpjax import errors


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on `flag_values` (tests parse a fresh set)."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/dpcap.py:tiny.",
      flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory (resumes if it "
                      "exists); local or gs://... .", flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for multi-process runs.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Number of processes.",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process' index.",
                       flag_values=flag_values)
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() and let jax detect the "
                    "cluster (TPU VM slice, SLURM, Open MPI).",
                    flag_values=flag_values)
  flags.DEFINE_bool("traceback", False, "Show the traceback of config and "
                    "data errors (default: one line and exit status 2).",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


define_flags()
FLAGS = flags.FLAGS

PREEMPTED_MESSAGE = ("dpjax: preempted at step {step}; checkpoint saved in "
                     "{workdir}; rerun the same command to resume.")


def _count(value: str | None) -> int:
  """Number of entries of a SLURM count ("2", "2(x3)") or host list."""
  if not value:
    return 0
  if value.split("(")[0].isdigit():
    return int(value.split("(")[0])
  return len([h for h in value.split(",") if h.strip()])


def distributed_reason(environ: Mapping[str, str], *,
                       coordinator_address: str | None = None,
                       multihost: bool = False) -> str | None:
  """Why this process should call jax.distributed.initialize (None: don't).

  Args:
    environ: the process environment (os.environ).
    coordinator_address: the --coordinator_address flag.
    multihost: the --multihost flag.

  Returns:
    A short reason for the logs, or None for a single-process run.
  """
  if coordinator_address:
    return "flags"
  if multihost:
    return "--multihost"
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "SLURM_JOB_ID" in environ and _count(
      environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")) > 1:
    return "SLURM"
  hosts = (environ.get("TPU_PROCESS_ADDRESSES")
           or environ.get("TPU_WORKER_HOSTNAMES"))
  if _count(hosts) > 1:
    return "TPU VM slice"
  return None


def _maybe_initialize_distributed() -> None:
  """Starts jax.distributed when flags or the environment ask for it."""
  import jax  # pylint: disable=g-import-not-at-top
  reason = distributed_reason(os.environ,
                              coordinator_address=FLAGS.coordinator_address,
                              multihost=FLAGS.multihost)
  if reason is None:
    return
  # Cross-process collectives of the CPU backend (tests, CPU clusters).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if FLAGS.coordinator_address:
    kwargs = dict(coordinator_address=FLAGS.coordinator_address,
                  num_processes=FLAGS.num_processes,
                  process_id=FLAGS.process_id)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global "
               "devices", reason, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _QuietFilter(py_logging.Filter):
  """Drops INFO (and lower) records of other libraries (Orbax alone logs
  ~250 lines around a short run's checkpoints); warnings always pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or
            os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


def _preempted_at_startup(signum, frame):
  """SIGTERM before the loop installs its own handler: nothing is written
  yet, so stop now (exit 0; the same command starts or resumes the run)."""
  del signum, frame
  print("dpjax: preempted during start-up; rerun the same command.",
        flush=True)
  sys.exit(0)


def main(argv):
  del argv
  signal.signal(signal.SIGTERM, _preempted_at_startup)
  if FLAGS.verbosity < 1:
    logging.get_absl_handler().addFilter(_QuietFilter())
  _maybe_initialize_distributed()
  from dpjax import recipes  # pylint: disable=g-import-not-at-top
  from dpjax.data import DataValidationError  # pylint: disable=g-import-not-at-top
  logging.vlog(1, "config:\n%s", FLAGS.config)
  try:
    results = recipes.run(FLAGS.config, FLAGS.workdir)
  except (errors.ConfigError, DataValidationError) as e:
    if FLAGS.traceback:
      raise
    print(f"dpjax: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if results.get("preempted"):
    message = PREEMPTED_MESSAGE.format(step=results["step"],
                                       workdir=FLAGS.workdir)
    print(message, flush=True)
    sys.exit(0)


if __name__ == "__main__":
  app.run(main, flags_parser=errors.flags_parser("dpjax"))
