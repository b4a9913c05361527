"""<workdir>/export/ is the one folder to publish (train/publish.py), and a
non-private run has no epsilon.

export/ holds the params (and EMA params), a results.json without private
values and the public evaluations per step without wall times; an
evaluation on data derived from the private source is "private_eval/" and
stays out of it.
"""

import json
import os

import jax
import numpy as np
import pytest

from dpjax import recipes
from dpjax.train import loop
from dpjax.train import metrics
from dpjax.train import publish
from tests.train import secrets_test


class _Eval:
  """A scheduled evaluator reading params only; `public` as configured."""

  def __init__(self, public: bool):
    self.public, self.log_steps = public, 1

  def due(self, step: int) -> bool:
    return True

  def run(self, params) -> dict[str, float]:
    return {"score/mean": float(np.mean(jax.tree.leaves(params)[0]))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  # pylint: disable-next=protected-access
  config = secrets_test._config(noise_seed=0)
  config.train.ema_decay = 0.9
  task = recipes.build(config)
  task.evaluators = {"public": _Eval(True), "heldout_users": _Eval(False)}
  workdir = str(tmp_path_factory.mktemp("export"))
  return workdir, loop.run(task, config, workdir)


def _read(workdir, name):
  with open(os.path.join(workdir, "export", name)) as f:
    return json.load(f)


def test_export_holds_params_results_and_metrics(exported):
  workdir, _ = exported
  assert sorted(os.listdir(os.path.join(workdir, "export"))) == [
      "ema_params", "metrics.json", "params", "results.json",
      "samples.json"]  # DP-Cap's captions of public held-out images.
  with open(os.path.join(workdir, "samples.json")) as f:
    assert _read(workdir, "samples.json") == json.load(f)


def test_a_private_source_evaluation_is_private_eval_and_not_exported(
    exported):
  workdir, results = exported
  for prefix in ("eval", "eval_ema", "private_eval", "private_eval_ema"):
    assert f"{prefix}/score/mean" in results  # The operator's copy.
  logged = metrics.read_csv(workdir)
  assert [s for s, _ in logged["private_eval/score/mean"]] == [1, 2]
  public = _read(workdir, "results.json")
  assert public == json.loads(json.dumps(publish.public_results(results)))
  assert not [k for k in public if k.startswith(("private/", "private_"))]
  assert public["eval/score/mean"] == results["eval/score/mean"]
  assert public["private"] is True and public["epsilon"] > 0
  assert public["secret_randomness"] is False  # noise_seed=0.


def test_exported_metrics_are_public_evaluations_without_time(exported):
  workdir, results = exported
  rows = _read(workdir, "metrics.json")
  assert [r["step"] for r in rows] == [1, 2]  # Periodic, then the end.
  for row in rows:
    assert set(row) == {"step", "eval/score/mean", "eval_ema/score/mean"}
  assert rows[-1]["eval/score/mean"] == results["eval/score/mean"]


def test_public_results_drop_every_private_value():
  results = {"epsilon": 1.0, "dp/steps": 3, "private": True,
             "private/loss": 2.0, "private_eval/x/acc": 0.5,
             "private_eval_ema/x/acc": 0.5, "eval/y/acc": 0.7}
  assert publish.public_results(results) == {
      "epsilon": 1.0, "dp/steps": 3, "private": True, "eval/y/acc": 0.7}


def test_a_non_private_run_has_no_epsilon(tmp_path):
  config = secrets_test._config()  # pylint: disable=protected-access
  config.privacy.enabled = False
  results = recipes.run(config, str(tmp_path))
  assert results["private"] is False and results["epsilon"] is None
  assert results["train/private"] is False
  assert "secret_randomness" not in results and "delta" not in results
  assert _read(str(tmp_path), "results.json")["epsilon"] is None
  # No epsilon column (TensorBoard warns on inf; 0 would read as perfect
  # privacy): the metrics say nothing of a guarantee there is not.
  logged = metrics.read_csv(str(tmp_path))
  assert "nonprivate/loss" in logged and "epsilon" not in logged
