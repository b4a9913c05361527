r"""Utility at equal epsilon: DP-SGD vs BandMF vs BLT vs augmentation multiplicity,
each evaluated on its raw parameters and on their EMA.

Every variant trains the same preset (same steps, expected batch and target
epsilon; sigma calibrated per mechanism) with `train.ema_decay` on, so each
run reports both the raw and the EMA parameters' held-out metrics. Seeds are
`config.seed` (model init, public data); the noise and sampling keys stay
secret OS entropy, so every run is an independent draw.

Run (by hand, not in the test suite; prints a markdown table):
  python benchmarks/utility.py --preset=dp_linear
  python benchmarks/utility.py --preset=dp_continual --seeds=0,1
  python benchmarks/utility.py --preset=vip --variants="dpsgd,bandmf b=4"
"""

import argparse
import json
import os
import statistics
import tempfile
import time

from absl import logging

from configs import dp_continual
from configs import dp_linear
from configs import vip
from dpjax import recipes

# preset -> (config factory, {metric name: results key}).
PRESETS = {
    "dp_linear": (lambda: dp_linear.get_config(), {
        "top1": "accuracy/top1", "ce": "accuracy/ce"}),
    # Fine-tuning and the tr(H) monitor off: time; the DP phase is the same.
    "dp_continual": (lambda: _continual(), {
        "top1": "classifier/top1", "probe": "linear_probe/label_acc"}),
    # ViP: MAE pretraining (400 public + 200 DP steps); the encoder's linear
    # probes of the shapes data's labels and the held-out MAE loss.
    "vip": (lambda: vip.get_config("tiny"), {
        "shape": "linear_probe/shape_acc", "color": "linear_probe/color_acc",
        "mae loss": "mae/heldout_loss"}),
}

# variant -> flattened overrides. Augmult needs augmentation to differ from
# K=1, so it is compared with the same augmentation at K=1.
VARIANTS = {
    "dpsgd": {},
    "bandmf b=4": {"privacy.mechanism": "bandmf", "privacy.bands": 4},
    "blt b=4": {"privacy.mechanism": "blt", "privacy.min_separation": 4},
    # dp_linear: the largest b with batch * b <= N (128 * 11 <= 1500).
    "blt b=11": {"privacy.mechanism": "blt", "privacy.min_separation": 11},
    # DP continual tiny: 256 * 77 <= 19,800 private images (2.6 epochs).
    "blt b=77": {"privacy.mechanism": "blt", "privacy.min_separation": 77},
    # ViP tiny: 512 * 39 <= 20,000 private images (5.1 epochs).
    "blt b=39": {"privacy.mechanism": "blt", "privacy.min_separation": 39},
    "dpsgd + augment": {"data.augment": True},
    "dpsgd + augment + augmult 4": {"data.augment": True, "train.augmult": 4},
    "bandmf b=4 + augment + augmult 4": {
        "privacy.mechanism": "bandmf", "privacy.bands": 4,
        "data.augment": True, "train.augmult": 4},
}


def _continual():
  c = dp_continual.get_config("tiny")
  c.monitor.enabled = False
  c.evals.fine_tune.log_steps = -1
  return c


def run(preset: str, variant: str, seed: int, ema_decay: float) -> dict:
  make, metrics = PRESETS[preset]
  config = make()
  overrides = dict(VARIANTS[variant], **{"seed": seed,
                                         "train.ema_decay": ema_decay})
  if "data.augment" in overrides and "augment" not in config.data:
    return {}  # The preset has no augmentation (dp_linear).
  config.update_from_flattened_dict(overrides)
  for e in config.evals.values():
    if e.log_steps > 0:
      e.log_steps = 0  # End only.
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.time()
    results = recipes.run(config, workdir)
  out = {"epsilon": results["epsilon"], "sigma": results["dp/noise_multiplier"],
         "seconds": time.time() - t0}
  for name, key in metrics.items():
    out[name] = results[f"eval/{key}"]
    out[f"{name} (EMA)"] = results[f"eval_ema/{key}"]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--ema_decay", type=float, default=0.99)
  parser.add_argument("--json", default="", help="also write rows here")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  for variant in args.variants.split(","):
    per_seed = [run(args.preset, variant, s, args.ema_decay) for s in seeds]
    if not per_seed[0]:
      continue
    rows.append((variant, per_seed))
    print(variant, json.dumps(per_seed), flush=True)
  keys = [k for k in rows[0][1][0] if k not in ("seconds",)]
  print(f"\n| {args.preset} variant | " + " | ".join(keys) + " | s/run |")
  print("|---" * (len(keys) + 2) + "|")
  for variant, per_seed in rows:
    cells = [" / ".join(f"{r[k]:.3f}" for r in per_seed) for k in keys]
    secs = statistics.mean(r["seconds"] for r in per_seed)
    print(f"| {variant} | " + " | ".join(cells) + f" | {secs:.0f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"preset": args.preset, "seeds": seeds, "rows": rows}, f)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
