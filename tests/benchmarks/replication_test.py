"""The replication scorecard's decision rule and the claims it declares."""

import math
import pathlib

import pytest

from benchmarks import replication


def test_rule_holds_reversed_not_shown():
  # se of each mean = 0.01 / sqrt(3); of the difference: 0.01 * sqrt(2/3).
  a = [0.30, 0.31, 0.32]
  se = 0.01 * math.sqrt(2 / 3)
  assert replication.verdict(a, [x - 3 * se for x in a], True)[
      "verdict"] == "holds"
  assert replication.verdict(a, [x - 1.5 * se for x in a], True)[
      "verdict"] == "not shown"
  assert replication.verdict(a, [x + 3 * se for x in a], True)[
      "verdict"] == "reversed"
  # Lower is better: a lower A holds.
  assert replication.verdict(a, [x + 3 * se for x in a], False)[
      "verdict"] == "holds"


def test_rule_against_a_constant_uses_a_alone():
  v = replication.verdict([0.25, 0.26, 0.27], 0.2, True)
  assert v["b_se"] == 0.0
  assert v["se"] == pytest.approx(0.01 / math.sqrt(3))
  assert v["verdict"] == "holds"


def test_a_claim_holds_only_when_every_decisive_test_holds():
  runs = {"public -> DP": [{"eval/classifier/top1": x,
                            "eval/linear_probe/label_acc": 0.1}
                           for x in (0.40, 0.41, 0.42)],
          "DP only": [{"eval/classifier/top1": x,
                       "eval/linear_probe/label_acc": 0.5}
                      for x in (0.30, 0.31, 0.32)],
          "public only": [{"eval/classifier/top1": x,
                           "eval/linear_probe/label_acc": 0.5}
                          for x in (0.40, 0.41, 0.43)]}
  card = replication.score("dp_continual", runs)
  verdicts = [t["verdict"] for t in card["tests"]]
  # Decisive: beats DP only, ties public only; secondary probe reversed.
  assert verdicts == ["not shown", "holds", "reversed", "reversed"]
  assert card["verdict"] == "partly"
  runs["public only"] = runs["DP only"]
  assert replication.score("dp_continual", runs)["verdict"] == "holds"
  assert "| dp_continual | public -> DP vs DP only |" in replication.markdown(
      {"dp_continual": card})


@pytest.mark.parametrize("name", sorted(replication.CLAIMS))
def test_every_test_names_arms_of_its_claim(name):
  claim = replication.CLAIMS[name]
  for t in claim.tests:
    assert t.a in claim.arms
    assert isinstance(t.b, float) or t.b in claim.arms
    assert t.metric.startswith("eval/")  # Public held-out metrics only.
  assert any(t.decisive for t in claim.tests)


def test_an_arm_shared_between_claims_is_the_same_run():
  seen = {}
  for name, claim in replication.CLAIMS.items():
    for arm in claim.arms:
      where = replication.arm_dir(name, arm, 0, "w")
      assert seen.setdefault(where, claim.command(arm)) == claim.command(arm)
  assert (replication.arm_dir("dpcap", "DP-Cap", 0, "w")
          == replication.arm_dir("dpcap_vs_vip", "DP-Cap", 0, "w"))


def test_the_committed_scorecard_is_what_the_docs_show():
  """benchmarks/replication.json (the runs) -> the README's table (decisive
  tests), the results page's (all tests) and the notebooks' plots."""
  root = pathlib.Path(__file__).resolve().parents[2]
  card = replication.load(str(root / "benchmarks" / "replication.json"))
  assert set(card) == set(replication.CLAIMS), "a declared claim has no row"
  for name, c in card.items():
    assert c["statement"] == replication.CLAIMS[name].statement
    assert all(t["seeds"] >= 3 for t in c["tests"]), name
    rows = {(t["a"], t["b"], t["metric"]) for t in c["tests"]}
    assert rows == {(t.a, t.b, t.metric)
                    for t in replication.CLAIMS[name].tests}, name
  readme = (root / "README.md").read_text()
  assert replication.markdown(card, decisive_only=True) in readme
  assert replication.markdown(card) in (root / "docs" / "results.md").read_text()
  for nb in sorted((root / "notebooks").glob("0[1-4]_*.ipynb")):
    src = nb.read_text()
    assert "replication.plot(" in src and '"scorecard"' in src, nb.name
