"""Tests for evaluate.from_config: config.evals -> scheduled evaluators."""

import ml_collections
import numpy as np
import pytest

from dpjax import evaluate
from dpjax.evaluate import linear_probe


def _context(loads):
  def probe_data():
    loads.append("probe")
    rs = np.random.RandomState(0)
    return {"image": rs.normal(size=(40, 3)).astype(np.float32),
            "y": np.arange(40) % 2}
  return evaluate.Context(
      "toy", fns={"features": lambda params, x: x * params},
      data={"probe": probe_data, "test": probe_data})


def _evals(**entries):
  return ml_collections.ConfigDict(entries)


def test_fields_pass_through_and_data_loads_on_first_use():
  loads = []
  evals = evaluate.from_config(_evals(
      probe=dict(type="linear_probe", log_steps=2, labels="y",
                 c_grid=(1.0,), batch_size=8),
      other=dict(type="few_shot", log_steps=0, label="y", shots=(1,),
                 seeds=1, prefix="fs"),
      off=dict(type="linear_probe", log_steps=-1, labels="y")),
      _context(loads))
  assert sorted(evals) == ["other", "probe"] and not loads
  probe = evals["probe"]
  assert (probe.type, probe.log_steps) == ("linear_probe", 2)
  assert [probe.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
  assert not evals["other"].due(2)  # log_steps=0: at the end only.
  e = probe.evaluator()
  assert isinstance(e, linear_probe.LinearProbe)
  assert (e.c_grid, e.batch_size, e.prefix) == ((1.0,), 8, "probe")
  assert sorted(probe.run(1.0)) == ["probe/y_acc", "probe/y_chance"]
  assert "fs/1shot_acc" in evals["other"].run(1.0)
  assert probe.evaluator() is e and len(loads) == 2  # probe + test, once.


@pytest.mark.parametrize("entry,message", [
    (dict(type="knn", log_steps=0), r"config.evals.e.type='knn' is not an "
     r"evaluator type: use one of \[.*'linear_probe'"),
    (dict(log_steps=0, labels="y"), "config.evals.e.type=None"),
    (dict(type="linear_probe", labels="y"), "config.evals.e.log_steps=None"),
    (dict(type="linear_probe", log_steps=0, labels="y", shots=(1,)),
     r"config.evals.e.shots is not a field of type 'linear_probe': its "
     r"fields are \[.*'c_grid'"),
    (dict(type="linear_probe", log_steps=0),
     "config.evals.e.labels is missing"),
    (dict(type="zero_shot", log_steps=0, label="y", prompts="test"),
     r"config.evals.e.pred='loglik': the toy recipe has no function of "
     r"that name; it has \['features'\]: use one of them or remove "
     "config.evals.e"),
    (dict(type="linear_probe", log_steps=0, labels="y",
          train_data="train"),
     r"config.evals.e.train_data='train': the toy recipe has no data set "
     r"of that name; it has \['probe', 'test'\]"),
])
def test_errors_name_field_value_and_fix(entry, message):
  with pytest.raises(ValueError, match=message):
    evaluate.from_config(_evals(e=entry), _context([]))


def test_an_evaluator_of_private_derived_data_is_not_public():
  """Data the recipe marks as derived from the private source make every
  evaluator that reads them (given or default field) non-public."""
  def data():
    return {"image": np.zeros((4, 3), np.float32), "y": np.arange(4) % 2}
  context = evaluate.Context(
      "toy", fns={"features": lambda params, x: x},
      data={"probe": data, "test": data, "other": data},
      private_data=("test",))
  evals = evaluate.from_config(_evals(
      default=dict(type="linear_probe", log_steps=0, labels="y"),
      public=dict(type="linear_probe", log_steps=0, labels="y",
                  test_data="other"),
      train=dict(type="linear_probe", log_steps=0, labels="y",
                 train_data="test", test_data="other")), context)
  assert {k: e.public for k, e in evals.items()} == dict(
      default=False, public=True, train=False)
  with pytest.raises(ValueError, match="private_data"):
    evaluate.Context("toy", fns={}, data={"probe": data},
                     private_data=("test",))
