"""`<workdir>/export/`: the one folder of a run that is safe to publish.

It holds the params (`checkpoint.export_params`: export/params and, with an
EMA, export/ema_params), `export/results.json` (the run's public facts:
results.json without any private value), `export/metrics.json` (the public
evaluations per evaluation step, without wall times: a step's time grows
with its realised batch size) and the task's summary of public held-out
data (`export/samples.json`, DP-Cap's captions). Everything else in the
workdir (its own results.json, metrics.csv, tensorboard/, checkpoints/,
private_*) and the console are the operator's (PRIVACY.md, "What you may
publish").

Process 0 writes; `epath` handles local and bucket (gs://) workdirs.
"""

import json
from typing import Any, Mapping

from etils import epath

# First path component of values computed on private data without DP:
# training metrics ("private/") and evaluations on data derived from the
# private source ("private_eval/", "private_eval_ema/").
PRIVATE_PREFIXES = ("private", "private_eval", "private_eval_ema")
# Evaluations on public held-out data (params only: covered by epsilon).
PUBLIC_EVAL_PREFIXES = ("eval", "eval_ema")


def _root(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "export"


def _is_private(key: str) -> bool:
  """A metric under PRIVATE_PREFIXES ("private" alone is the run's flag)."""
  return "/" in key and key.split("/", 1)[0] in PRIVATE_PREFIXES


def public_results(results: Mapping[str, Any]) -> dict[str, Any]:
  """`results` without its private values (keys under PRIVATE_PREFIXES)."""
  return {k: v for k, v in results.items() if not _is_private(k)}


def public_evals(metrics: Mapping[str, float]) -> dict[str, float]:
  """The public evaluations among `metrics` (eval/*, eval_ema/*)."""
  return {k: float(v) for k, v in metrics.items()
          if k.split("/", 1)[0] in PUBLIC_EVAL_PREFIXES}


def write_json(workdir: str, name: str, value: Any) -> None:
  """export/<name>: `value` as JSON (the caller vouches it is public)."""
  root = _root(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / name).write_text(json.dumps(value, indent=1, default=float))


def write_results(workdir: str, results: Mapping[str, Any]) -> None:
  """export/results.json: `public_results(results)`."""
  write_json(workdir, "results.json", public_results(results))


def add_metrics(workdir: str, step: int, metrics: Mapping[str, float]) -> None:
  """Adds the public evaluations of `metrics` at `step` to
  export/metrics.json ([{"step": s, name: value, ...}] by step; a step
  evaluated again, e.g. after a resume, is replaced name by name)."""
  evals = public_evals(metrics)
  if not evals:
    return
  path = _root(workdir) / "metrics.json"
  rows = json.loads(path.read_text()) if path.exists() else []
  by_step = {row["step"]: row for row in rows}
  by_step.setdefault(int(step), {"step": int(step)}).update(evals)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps([by_step[s] for s in sorted(by_step)],
                             indent=1))


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """export/metrics.json's rows ([] if there is none)."""
  path = _root(workdir) / "metrics.json"
  return json.loads(path.read_text()) if path.exists() else []
