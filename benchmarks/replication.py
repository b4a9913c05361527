r"""Replication scorecard: each paper's claims, decided over seeds by a rule
fixed before the runs.

A claim is a set of arms (each a `python -m dpjax.main` run of one config
with its flags) and tests "arm A beats arm B on metric M" (or beats a
constant, e.g. chance). Every arm runs once per seed; `config.seed` sets
the model init and public data, while the noise and sampling keys stay
secret OS entropy, so the seeds are independent draws of the whole run.

The rule (declared with the claims in docs/results.md, before any run):
with n >= 3 seeds per arm, a test HOLDS when mean(A) - mean(B) > 2 standard
errors of the difference (sqrt(se_A^2 + se_B^2), se = stdev / sqrt(n)), is
REVERSED when it is < -2 s.e., and is NOT SHOWN otherwise; a claim holds
when all its decisive tests hold. (For "lower is better" metrics the sign
flips.)

Each run keeps its workdir under --workdir (resumable: a finished run is
read back, an interrupted one resumes), and the aggregated scorecard is
written to --out as JSON (what the notebooks and docs read).

Run (by hand, hours on a 2-core CPU; prints the scorecard as markdown):
  PYTHONPATH=. python benchmarks/replication.py --claims=dp_continual,dpfedemb
  PYTHONPATH=. python benchmarks/replication.py --report_only
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

_FAST_CONTINUAL = ("--config.monitor.enabled=False",
                   "--config.evals.fine_tune.log_steps=-1")


@dataclasses.dataclass(frozen=True)
class Test:
  """`a` beats `b` (an arm name, or a constant such as chance) on `metric`
  (a results.json key); decisive tests decide the claim."""
  a: str
  b: str | float
  metric: str
  higher_is_better: bool = True
  decisive: bool = True


@dataclasses.dataclass(frozen=True)
class Claim:
  """`arms`: arm -> extra dpjax.main flags; a first flag `--config=...`
  replaces `config` for that arm. Arms of one config with the same name are
  the same runs in every claim (they share their workdirs)."""
  statement: str
  config: str
  arms: dict[str, tuple[str, ...]]
  tests: tuple[Test, ...]

  def command(self, arm: str) -> tuple[str, tuple[str, ...]]:
    """(config, flags) of `arm`."""
    flags = self.arms[arm]
    if flags and flags[0].startswith("--config="):
      return flags[0].split("=", 1)[1], flags[1:]
    return self.config, flags


CLAIMS = {
    "dp_continual": Claim(
        "Public share (1%) then DP beats DP only and public only at the "
        "same epsilon (8) and total steps, by the trained classifier's "
        "held-out top-1.",
        "configs/dp_continual.py:tiny",
        {"public -> DP": _FAST_CONTINUAL,
         "DP only": _FAST_CONTINUAL + ("--config.arm=private_only",),
         "public only": _FAST_CONTINUAL + ("--config.arm=public_only",)},
        (Test("public -> DP", "public only", "eval/classifier/top1"),
         Test("public -> DP", "DP only", "eval/classifier/top1"),
         Test("public -> DP", "public only", "eval/linear_probe/label_acc",
              decisive=False),
         Test("public -> DP", "DP only", "eval/linear_probe/label_acc",
              decisive=False))),
    "dpfedemb": Claim(
        "The user-level DP rounds (epsilon 4) improve the public init's "
        "open-set retrieval on held-out identities.",
        "configs/dpfedemb.py:tiny",
        {"public init + DP rounds": (),
         "public init": ("--config.phases=public",)},
        (Test("public init + DP rounds", "public init",
              "eval/retrieval/recall_at_far_0.1"),
         Test("public init + DP rounds", "public init",
              "eval/retrieval/recall_at_1", decisive=False))),
    "dpcap": Claim(
        "At epsilon 8 the DP-Cap encoder beats a random encoder on shape "
        "(linear probe) and colour (1-shot), and the captioner scores above "
        "chance on zero-shot shape and the ARO-style colour swap.",
        "configs/dpcap.py:tiny",
        {"DP-Cap": (), "random init": ("--config.eval_only=True",)},
        (Test("DP-Cap", "random init", "eval/linear_probe_1shape/shape_acc"),
         Test("DP-Cap", "random init",
              "eval/few_shot_1shape_color/1shot_acc"),
         Test("DP-Cap", 0.2, "eval/zero_shot/acc"),
         Test("DP-Cap", 0.5, "eval/aro/swap_color_acc"))),
    "dpcap_vs_vip": Claim(
        "At the same epsilon (8), images, steps and batch, the DP-Cap "
        "encoder beats a DP-MAE (ViP) encoder trained from scratch by "
        "linear probe (shape and colour, all held-out images).",
        "configs/dpcap.py:tiny",
        {"DP-Cap": (),
         "DP-MAE on the same images": (
             "--config=configs/vip.py:tiny", "--config.pretrain.steps=0",
             "--config.data.num_examples=50000", "--config.train.steps=400",
             "--config.data.probe_train_examples=4000",
             "--config.data.probe_test_examples=2000",
             "--config.data.eval_num_examples=2000")},
        (Test("DP-Cap", "DP-MAE on the same images",
              "eval/linear_probe/shape_acc"),
         Test("DP-Cap", "DP-MAE on the same images",
              "eval/linear_probe/color_acc"))),
    "dpcap_batch": Claim(
        "At the same epsilon (8) and steps, a 4x larger expected batch "
        "(512 vs 128, sigma recalibrated) lowers DP-Cap's held-out caption "
        "loss (the TAN argument for large batches).",
        "configs/dpcap.py:tiny",
        {"DP-Cap": (),
         "DP-Cap, batch 128": ("--config.train.batch_size=128",
                               "--config.train.microbatch_size=128")},
        (Test("DP-Cap", "DP-Cap, batch 128", "eval/caption/heldout_loss",
              higher_is_better=False),
         Test("DP-Cap", "DP-Cap, batch 128",
              "eval/linear_probe_1shape/shape_acc", decisive=False))),
    "vip": Claim(
        "The synthetic warm start + DP-MAE (epsilon 8) beats DP-MAE from "
        "scratch and the warm start alone, by linear probe.",
        "configs/vip.py:tiny",
        {"warm start + DP": (),
         "DP from scratch": ("--config.pretrain.steps=0",),
         "warm start alone": ("--config.phases=pretrain",)},
        (Test("warm start + DP", "DP from scratch",
              "eval/linear_probe/color_acc"),
         Test("warm start + DP", "DP from scratch",
              "eval/linear_probe/shape_acc"),
         Test("warm start + DP", "warm start alone",
              "eval/linear_probe/color_acc"),
         Test("warm start + DP", "warm start alone",
              "eval/linear_probe/shape_acc"),
         Test("warm start + DP", "DP from scratch", "eval/mae/heldout_loss",
              higher_is_better=False, decisive=False))),
}


def arm_dir(claim: str, arm: str, seed: int, workdir: str) -> str:
  """<workdir>/<config file stem>/<arm>/seed<seed>."""
  config, _ = CLAIMS[claim].command(arm)
  stem = os.path.basename(config.split(":")[0]).removesuffix(".py")
  return os.path.join(workdir, stem, arm.replace(" ", "_").replace(">", ""),
                      f"seed{seed}")


def run_arm(claim: str, arm: str, seed: int, workdir: str) -> dict:
  """One arm at one seed through the real entry point; its results.json."""
  wd = arm_dir(claim, arm, seed, workdir)
  path = os.path.join(wd, "results.json")
  if not os.path.exists(path):
    config, flags = CLAIMS[claim].command(arm)
    cmd = [sys.executable, "-m", "dpjax.main", f"--config={config}",
           f"--workdir={wd}", f"--config.seed={seed}", *flags]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:])}", flush=True)
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "replication.log"), "a") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=log)
  with open(path) as f:
    return json.load(f)


def mean_se(xs: list[float]) -> tuple[float, float]:
  m = statistics.fmean(xs)
  return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1
             else float("nan"))


def verdict(a: list[float], b: list[float] | float, higher: bool) -> dict:
  """The declared rule: a difference beyond 2 standard errors."""
  ma, sa = mean_se(a)
  mb, sb = mean_se(b) if isinstance(b, list) else (float(b), 0.0)
  diff = (ma - mb) if higher else (mb - ma)
  se = math.hypot(sa, sb)
  word = ("holds" if diff > 2 * se else
          "reversed" if diff < -2 * se else "not shown")
  return {"a_mean": ma, "a_se": sa, "b_mean": mb, "b_se": sb, "diff": diff,
          "se": se, "verdict": word}


def score(claim: str, runs: dict[str, list[dict]]) -> dict:
  """The claim's tests over its runs (arm -> one results dict per seed)."""
  rows = []
  for t in CLAIMS[claim].tests:
    a = [r[t.metric] for r in runs[t.a]]
    b = [r[t.metric] for r in runs[t.b]] if isinstance(t.b, str) else t.b
    rows.append(dict(dataclasses.asdict(t), seeds=len(a),
                     **verdict(a, b, t.higher_is_better)))
  decisive = [r["verdict"] for r in rows if r["decisive"]]
  overall = ("holds" if all(v == "holds" for v in decisive) else
             "partly" if "holds" in decisive else "does not hold")
  keys = ["epsilon", "dp/noise_multiplier"] + sorted(
      {t.metric for t in CLAIMS[claim].tests})
  values = {arm: {k: [r.get(k) for r in rs] for k in keys
                  if any(k in r for r in rs)} for arm, rs in runs.items()}
  return {"statement": CLAIMS[claim].statement,
          "config": CLAIMS[claim].config,
          "arms": {a: list(f) for a, f in CLAIMS[claim].arms.items()},
          "values": values, "tests": rows, "verdict": overall}


def markdown(card: dict, decisive_only: bool = False) -> str:
  """The scorecard as a markdown table, one row per test."""
  lines = ["| claim | A vs B | metric | A mean +- s.e. | B mean +- s.e. | "
           "seeds | holds? |", "|---|---|---|---|---|---|---|"]
  for name, c in card.items():
    for t in c["tests"]:
      if decisive_only and not t["decisive"]:
        continue
      b = t["b"] if isinstance(t["b"], str) else f"chance {t['b']:g}"
      tag = "" if t["decisive"] else " (secondary)"
      lines.append(
          f"| {name} | {t['a']} vs {b} | `{t['metric']}`{tag} | "
          f"{t['a_mean']:.3f} +- {t['a_se']:.3f} | "
          + (f"{t['b_mean']:.3f} +- {t['b_se']:.3f}" if isinstance(t["b"], str)
             else f"{t['b_mean']:.3f} (fixed)") + f" | {t['seeds']} | "
          f"{t['verdict']} |")
  return "\n".join(lines)


def load(path: str = "benchmarks/replication.json") -> dict:
  """The committed scorecard (claim -> score())."""
  with open(path) as f:
    return json.load(f)


def plot(claim: str, card: dict | None = None):
  """One panel per metric of `claim`: each arm's mean +- s.e. (bars), its
  seeds (dots) and any constant it is tested against (dashed); the title
  carries the verdicts. Prints the claim's scorecard rows."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  c = (card or load())[claim]
  metrics = list(dict.fromkeys(t["metric"] for t in c["tests"]))
  fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                           figsize=(3.6 * len(metrics), 3.2))
  for ax, m in zip(axes[0], metrics):
    arms = [a for a in c["values"] if m in c["values"][a]]
    for i, arm in enumerate(arms):
      xs = c["values"][arm][m]
      mean, se = mean_se(xs)
      ax.bar(i, mean, yerr=se, capsize=4, color=f"C{i}", alpha=0.6)
      ax.plot([i] * len(xs), xs, "k.", ms=4)
    tests = [t for t in c["tests"] if t["metric"] == m]
    for t in tests:
      if not isinstance(t["b"], str):
        ax.axhline(t["b"], ls="--", c="k", lw=1)
    ax.set_xticks(range(len(arms)), arms, rotation=15, fontsize=8)
    ax.set_title(m.split("/", 1)[1] + "\n" + "; ".join(
        f"vs {t['b'] if isinstance(t['b'], str) else t['b']}: {t['verdict']}"
        for t in tests), fontsize=8)
  fig.suptitle(f"{claim}: {c['verdict']} ({len(c['seeds'])} seeds)",
               fontsize=9)
  fig.tight_layout()
  plt.show()
  print(markdown({claim: c}))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--claims", default=",".join(CLAIMS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="runs/replication")
  p.add_argument("--out", default="benchmarks/replication.json")
  p.add_argument("--report_only", action="store_true",
                 help="score the finished runs only; run nothing")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  card = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      card = json.load(f)
  for claim in args.claims.split(","):
    runs = {}
    for arm in CLAIMS[claim].arms:
      runs[arm] = []
      for s in seeds:
        if args.report_only and not os.path.exists(os.path.join(
            arm_dir(claim, arm, s, args.workdir), "results.json")):
          continue
        runs[arm].append(run_arm(claim, arm, s, args.workdir))
    if all(len(r) >= 2 for r in runs.values()):
      try:
        card[claim] = score(claim, runs)
      except KeyError as e:  # A misnamed metric: say what there is.
        keys = sorted(k for r in runs.values() for k in r[0]
                      if k.startswith("eval"))
        print(f"{claim}: no metric {e}; results have {keys}", flush=True)
        continue
      card[claim]["seeds"] = seeds
      with open(args.out, "w") as f:
        json.dump(card, f, indent=1)
  print(markdown(card))


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
