r"""Private hyper-parameter search: `python -m dpjax.tune`.

  python -m dpjax.tune --config=configs/dp_linear.py --workdir=runs/tune \
      --space=space.json --score=eval/accuracy/top1 --k_mean=4

Random search (space file: dpjax/tune/space.py). The number of trials K is
drawn secretly (OS entropy) from Poisson(--k_mean) or a truncated negative
binomial (--k_distribution=truncated_negative_binomial, --k_eta, --k_gamma
or --k_mean); each trial is a normal dpjax run in <workdir>/trials/<i>/ and
the best by --score (an evaluation on PUBLIC held-out data, eval/...: post-
processing of the trial's DP params) is released. The search's (epsilon,
delta) covers that release (Papernot & Steinke 2022, privacy/tuning.py)
only if nothing else of the search is published: not K, not the other
trials (their params, scores or hyper-parameters), not the released
trial's index.

Files: <workdir>/private_tune.json (K, every trial's values; owner-only),
<workdir>/trials/ (owner-only), <workdir>/tune/results.json and
tune/score_vs_<field>.png (every trial: the operator's, owner-only), and
<workdir>/tune/export/: the release (the best trial's export/ plus
search.json: the search's epsilon and how it was computed, the released
hyper-parameters and score).

--target_epsilon: the whole search's epsilon; each trial's
privacy.target_epsilon is calibrated so that the search meets it.
--tan: trials are TAN simulations at --tan_batch_size (not a release, no
epsilon), then one private run of the chosen values at full batch.
Rerunning the same command resumes (finished trials are not rerun).
"""

import sys
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "e.g. configs/dp_linear.py",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Search directory (resumes).")
flags.DEFINE_string("space", None, "JSON search space (dpjax/tune/space.py).")
flags.DEFINE_string("score", None, "Selection metric of results.json, on "
                    "public held-out data, e.g. eval/accuracy/top1.")
flags.DEFINE_enum("mode", "max", ["max", "min"], "Best = max or min score.")
flags.DEFINE_string("k_distribution", None, "poisson | "
                    "truncated_negative_binomial (default: the space's "
                    "\"trials\", else poisson).")
flags.DEFINE_float("k_mean", None, "E[K] (Poisson: >= 1).")
flags.DEFINE_float("k_eta", None, "Truncated negative binomial eta (> -1; "
                   "1: geometric, 0: logarithmic).")
flags.DEFINE_float("k_gamma", None, "Truncated negative binomial gamma.")
flags.DEFINE_float("target_epsilon", None, "Epsilon of the whole search: "
                   "calibrates each trial's privacy.target_epsilon.")
flags.DEFINE_bool("tan", False, "Search with TAN simulations, then one "
                  "private run at full batch.")
flags.DEFINE_integer("tan_batch_size", 0, "Batch of the TAN simulations.")
flags.DEFINE_integer("stop_after", 0, "Stop after this many new trials "
                     "(0: never; to split a search, and for tests).")
flags.DEFINE_bool("traceback", False, "Show tracebacks of config errors.")
flags.mark_flags_as_required(["config", "workdir", "space", "score"])
FLAGS = flags.FLAGS


def _settings(space: dict) -> dict[str, Any]:
  """K's distribution: flags over the space's "trials" block."""
  spec = dict(space.get("trials", {}))
  for key, value in (("distribution", FLAGS.k_distribution),
                     ("mean", FLAGS.k_mean), ("eta", FLAGS.k_eta),
                     ("gamma", FLAGS.k_gamma)):
    if value is not None:
      spec[key] = value
  spec.setdefault("distribution", "poisson")
  return spec


def main(argv):
  del argv
  from dpjax import errors  # pylint: disable=g-import-not-at-top
  from dpjax.tune import search as tune_run  # pylint: disable=g-import-not-at-top
  from dpjax.tune import space as tune_space  # pylint: disable=g-import-not-at-top
  try:
    tune_run.check_score(FLAGS.score)
    space = tune_space.load(FLAGS.space)
    out = tune_run.search(
        FLAGS.config, FLAGS.workdir, space, score=FLAGS.score,
        mode=FLAGS.mode, k_spec=_settings(space),
        target_epsilon=FLAGS.target_epsilon, tan=FLAGS.tan,
        tan_batch_size=FLAGS.tan_batch_size, stop_after=FLAGS.stop_after)
  except errors.ConfigError as e:
    if FLAGS.traceback:
      raise
    print(f"dpjax.tune: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if out.get("stopped"):
    print(f"dpjax.tune: {out['stopped']}; rerun the same command to resume.",
          flush=True)


if __name__ == "__main__":
  app.run(main)
