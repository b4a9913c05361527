"""Tests for the dpjax.evaluate name lookup."""

import pytest

from dpjax import evaluate
from dpjax.evaluate import linear_probe
from dpjax.evaluate import retrieval


def test_get_known_names():
  assert evaluate.get("linear_probe") is linear_probe.LinearProbe
  assert evaluate.get("retrieval") is retrieval.Retrieval
  for name, cls in evaluate.EVALUATORS.items():
    assert evaluate.get(name) is cls
    assert callable(getattr(cls, "run"))


def test_get_unknown_lists_valid_names():
  with pytest.raises(ValueError, match="few_shot.*linear_probe"):
    evaluate.get("knn")
