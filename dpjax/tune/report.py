"""What `python -m dpjax.tune` writes and prints (see its docstring).

tune/results.json, the printed table and tune/score_vs_fields.png show
every trial, hence K: they are the operator's (owner-only files), never a
release. tune/export/ is the release: the chosen run's export/ and
search.json (its values, its score and the epsilon covering it).
"""

import json
import math
import os
import shutil
from typing import Any, Mapping

from dpjax import private_files
from dpjax.tune import space as tune_space


def _tune_dir(workdir: str) -> str:
  path = os.path.join(workdir, "tune")
  os.makedirs(path, exist_ok=True)
  return path


def release(workdir: str, export: str, out: Mapping[str, Any]) -> None:
  """tune/export/: a copy of `export` plus search.json (no trial index, no
  K, nothing of the other trials)."""
  dest = os.path.join(_tune_dir(workdir), "export")
  if os.path.exists(dest):
    shutil.rmtree(dest)
  shutil.copytree(export, dest)
  chosen = out.get("final") or out["trials"][out["released_trial"]]
  public = dict(values=chosen["values"], score_name=out["score"],
                score=chosen["score"], search=out["search"])
  if "final" in out:
    public["final_run"] = dict(epsilon=chosen["epsilon"],
                               delta=chosen["delta"])
  with open(os.path.join(dest, "search.json"), "w", encoding="utf-8") as f:
    json.dump(public, f, indent=1, default=float)


def table(out: Mapping[str, Any]) -> str:
  """Every trial's values, score and epsilon; * marks the released one."""
  names = sorted({k for t in out["trials"] for k in t["values"]})
  head = ["trial"] + names + [out["score"], "trial eps"]
  rows = [head]
  for i, t in enumerate(out["trials"]):
    mark = "*" if i == out["released_trial"] else " "
    rows.append([f"{mark}{i}"] + [_fmt(t["values"].get(n)) for n in names]
                + [_fmt(t["score"]), _fmt(t["epsilon"])])
  widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
  s = out["search"]
  if s.get("epsilon") is None:
    lines.append(f"search: {s['how']}")
  else:
    lines.append(f"search: epsilon {s['epsilon']:.4g} at delta "
                 f"{s.get('delta', float('nan')):.3g} for the released "
                 "trial (K and the other trials: not for publication)")
  if "final" in out:
    f = out["final"]
    lines.append(f"final private run: {out['score']}={_fmt(f['score'])}, "
                 f"epsilon {f['epsilon']:.4g} at delta {f['delta']:.3g}")
  return "\n".join(lines)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if math.isfinite(v) else str(v)
  return "-" if v is None else str(v)


def plot(path: str, out: Mapping[str, Any], space: Mapping[str, Any]) -> bool:
  """Score against each searched field (owner-only PNG); False if
  matplotlib is missing."""
  try:
    # A bare Figure: pyplot's global backend (a notebook's) stays as it is.
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  searched = tune_space.fields(space)
  fig = figure.Figure(figsize=(4 * len(searched), 3.2))
  axes = fig.subplots(1, len(searched), squeeze=False)
  best = out["released_trial"]
  for ax, (field, spec) in zip(axes[0], searched.items()):
    xs = [t["values"][field] for t in out["trials"]]
    ys = [t["score"] for t in out["trials"]]
    ax.scatter([str(x) for x in xs] if "choice" in spec else xs, ys)
    if best is not None:
      ax.scatter([str(xs[best]) if "choice" in spec else xs[best]],
                 [ys[best]], marker="*", s=200, c="red")
    if "log_uniform" in spec:
      ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel(out["score"])
  fig.tight_layout()
  with private_files.open_private(path):
    pass  # Created owner-only; savefig keeps the mode.
  fig.savefig(path)
  return True


def write(workdir: str, out: Mapping[str, Any],
          space: Mapping[str, Any]) -> None:
  """tune/results.json and the plot (owner-only), then prints the table."""
  root = _tune_dir(workdir)
  private_files.write_private_text(os.path.join(root, "results.json"),
                                   json.dumps(out, indent=1, default=float))
  if out["trials"] and not plot(os.path.join(root, "score_vs_fields.png"),
                                out, space):
    print("dpjax.tune: matplotlib is not installed: no plot", flush=True)
  print(table(out), flush=True)
