"""`import dpjax.privacy` must not pull in Flax, Grain or TFDS."""

import subprocess
import sys


def test_privacy_import_is_light():
  code = (
      "import sys, dpjax.privacy\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
      "('flax', 'grain', 'tensorflow_datasets', 'tensorflow'))\n"
      "print(repr(bad))\n"
      "assert not bad, bad\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.strip() == "[]"


def test_public_api_names():
  import dpjax.privacy as privacy  # pylint: disable=g-import-not-at-top
  for name in ("per_example_grads", "clip_pytree", "clipped_grad",
               "privatize", "add_noise", "dp_aggregate", "dpsgd", "dpadamw",
               "epsilon", "calibrate_noise_multiplier", "dp_event",
               "PrivacyLedger", "poisson_sample", "sample_indices",
               "total_amount_of_noise", "tan_simulation", "clipping",
               "noise", "optimizers", "sampling", "accounting", "ledger",
               "bandmf", "bandmf_noise", "blt", "blt_noise"):
    assert hasattr(privacy, name), name
