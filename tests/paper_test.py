"""Every `:paper` preset plans and executes at full model size on CPU.

For each recipe: (a) `dpjax.plan` of the `:paper` preset compiles its steps
on the 8 simulated devices (stand-in data; nothing runs) and reports the
paper's parameter count and epsilon; (b) `python -m dpjax.main
--config=configs/<recipe>.py:paper,smoke` trains its one real DP step of
the same model (same parameter shapes, image size, vocabulary, clipping
and dtype as `:paper`) on one CPU device to completion and reports epsilon.

The smoke runs are one test function, the recipes in sequence: a paper-size
step needs several GiB, so two must never run at once (pytest -n 2
schedules test functions; the plans compile abstract shapes and may run
beside it). Each smoke run is its own process on one device: its memory is
returned at exit, and 8 simulated devices would hold 8 replicas of the
optimizer state.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from dpjax import plan as plan_lib
from dpjax import recipes
from dpjax.train import hardware
from dpjax.train import stand_in

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# recipe: (epsilon of the :paper plan, as in docs/paper_scale.md
# table; an evaluation metric the smoke run reports).
PAPER = {
    "dpcap": (7.34, "eval/caption/heldout_loss"),
    "vip": (7.99, "eval/mae/heldout_loss"),
    "dp_continual": (8.00, "eval/classifier/top1"),
    "dpfedemb": (20.34, "eval/retrieval/recall_at_far_0.1"),
}


def _stood_in(module):
  """The :paper config with the :tiny preset's data, as dpjax.plan does
  (synthetic identities are held out by construction: the stand-in sets
  data.heldout_user_fraction to the tiny preset's 0)."""
  return stand_in.stand_in_data(module.get_config("paper"),
                                module.get_config("tiny"))[0]


def _param_shapes(config):
  task = recipes.get(config.recipe).build(config)
  return jax.eval_shape(task.init_params, jax.random.PRNGKey(0))


def _smoke(name: str, workdir: str) -> dict:
  """Runs the documented smoke command on one CPU device; its results."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "-m", "dpjax.main",
       f"--config=configs/{name}.py:paper,smoke", f"--workdir={workdir}",
       "--config.privacy.noise_seed=0", "--config.privacy.sampling_seed=0"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "done: step" in proc.stderr and "epsilon" in proc.stderr
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_plans(name):
  """`dpjax.plan` of the :paper preset compiles on 8 simulated devices (no
  step runs; abstract params) with the paper's model and epsilon, and fits
  them (2.9 GiB each on a 24 GiB host: `--mesh=cpu:8` exits 0)."""
  paper_epsilon, _ = PAPER[name]
  module = importlib.import_module(f"configs.{name}")
  paper, smoke = _stood_in(module), module.get_config("paper,smoke")
  for key in ("model", "privacy.method", "privacy.clipping",
              "privacy.l2_clip_norm", "privacy.noise_multiplier",
              "train.dtype", "data.image_size"):
    get = lambda c: eval(f"c.{key}", {"c": c})  # pylint: disable=eval-used
    assert get(smoke) == get(paper), (name, key)
  shapes = _param_shapes(paper)
  assert jax.tree.map(lambda x: x.shape, _param_shapes(smoke)) == (
      jax.tree.map(lambda x: x.shape, shapes)), name
  r = plan_lib.plan(paper, "cpu:8", chip=hardware.Chip(
      "CPU (24 GiB host)", 1e12, 24 * 2**30 // 8))
  assert r["fits"], r["problems"]
  assert r["params"] == sum(math.prod(x.shape)
                            for x in jax.tree.leaves(shapes))
  private = [p for p in r["phases"] if p["private"]]
  assert private[0]["epsilon"] == pytest.approx(paper_epsilon, abs=0.01)


def test_paper_presets_execute(tmp_path):
  """One real DP step of each :paper model at full size (the documented
  `:paper,smoke` command), in sequence: never two paper-size steps at once."""
  for name, (_, metric) in PAPER.items():
    results = _smoke(name, str(tmp_path / name))
    assert results["step"] == results["total_steps"] >= 1, name
    assert 0 < results["epsilon"] < math.inf
    assert math.isfinite(results[metric]), (name, metric)
