r"""dpjax entry point: `python -m dpjax.main --config=configs/dpcap.py:tiny`.

Flags: --config (an ml_collections config file with `get_config(arg)`; override
any field with e.g. --config.train.steps=10) and --workdir (checkpoints,
metrics, results; rerunning the same command resumes from it). Multi-host
runs (TPU VM, SLURM, or --coordinator_address) initialise jax.distributed.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/dpcap.py:tiny.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (resumes if it exists).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process' index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _maybe_initialize_distributed() -> None:
  """Starts jax.distributed when flags or the environment ask for it."""
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif any(k in os.environ for k in (
      "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS")):
    if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
      jax.distributed.initialize()


def main(argv):
  del argv
  _maybe_initialize_distributed()
  from dpjax.train import loop  # pylint: disable=g-import-not-at-top
  logging.info("config:\n%s", FLAGS.config)
  loop.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
