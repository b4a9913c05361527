"""launch/* --dry-run print the expected commands; dpjax.main detects
multi-host environments (flags, SLURM, TPU VM slices)."""

import os
import subprocess

import pytest

from dpjax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script: str, *args: str, **env) -> list[str]:
  out = subprocess.run(
      ["bash", os.path.join(REPO, "launch", script), "--dry-run", *args],
      env=dict(os.environ, **env), capture_output=True, text=True,
      check=True, timeout=30)
  return out.stdout.strip().splitlines()


def test_tpu_vm_creates_sets_up_and_runs_on_all_workers():
  lines = _dry_run("tpu_vm.sh", "--create", "--setup", "dpcap-v4",
                   "us-central2-b", "configs/dpcap.py", "gs://b/run",
                   "--config.train.steps=10", PROJECT="")
  assert lines[0] == (
      "gcloud compute tpus tpu-vm create dpcap-v4 --zone=us-central2-b "
      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  assert "tpu-vm scp" in lines[2] and "--worker=all" in lines[2]
  assert "pip install" in lines[3] and "--worker=all" in lines[3]
  assert lines[-1] == (
      "gcloud compute tpus tpu-vm ssh dpcap-v4 --zone=us-central2-b "
      "--worker=all --command 'cd ~/dpjax && python3 -m dpjax.main "
      "--config=configs/dpcap.py --workdir=gs://b/run --multihost "
      "--config.train.steps=10'")


def test_tpu_vm_resume_only_runs_and_honours_environment():
  lines = _dry_run("tpu_vm.sh", "t", "z", "configs/dpcap.py:tiny",
                   "gs://b/r", PROJECT="p", PYTHON="python3.11")
  assert lines == [
      "gcloud compute tpus tpu-vm ssh t --zone=z --project=p --worker=all "
      "--command 'cd ~/dpjax && python3.11 -m dpjax.main "
      "--config=configs/dpcap.py:tiny --workdir=gs://b/r --multihost'"]


def test_tpu_vm_refuses_a_local_workdir():
  out = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "--dry-run", "t",
       "z", "configs/dpcap.py", "runs/run"], capture_output=True, text=True)
  assert out.returncode == 2 and "gs://" in out.stderr


def test_slurm_runs_one_task_per_node():
  env = {k: "" for k in ("SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE")}
  lines = _dry_run("slurm_gpu.sbatch", "configs/dpcap.py", "/shared/run",
                   "--config.train.steps=10", **env)
  assert lines == [
      "srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 "
      "--kill-on-bad-exit=1 python -m dpjax.main --config=configs/dpcap.py "
      "--workdir=/shared/run --config.train.steps=10"]
  with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch")) as f:
    header = f.read()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --signal=TERM@120", "#SBATCH --requeue"):
    assert line in header


def test_local_2proc_starts_two_coordinated_processes():
  lines = _dry_run("local_2proc.sh", "configs/dpcap.py:tiny", "runs/w",
                   "--config.train.steps=3", PYTHON="python", PORT="12000")
  assert lines[-1] == "wait"
  for p, line in enumerate(lines[:2]):
    assert line == (
        "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4"
        " python -m dpjax.main --config=configs/dpcap.py:tiny --workdir=runs/w"
        " --coordinator_address=localhost:12000 --num_processes=2"
        f" --process_id={p} --config.train.steps=3"
        f" > runs/w/logs/process_{p}.log 2>&1 &")


@pytest.mark.parametrize("environ,flags,want", [
    ({}, {}, None),
    ({}, {"coordinator_address": "h:1"}, "flags"),
    ({}, {"multihost": True}, "--multihost"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}, "JAX_COORDINATOR_ADDRESS"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, {}, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, {}, None),  # One task.
    ({"SLURM_NTASKS": "2"}, {}, None),  # No job: a stale variable.
    ({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, {}, "TPU VM slice"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, {}, None),  # Single-host VM.
])
def test_distributed_reason(environ, flags, want):
  assert main.distributed_reason(environ, **flags) == want
