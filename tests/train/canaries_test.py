"""config.audit: canaries enter the private data and the run is audited."""

import json

import numpy as np
import pytest

from configs import dpcap as dpcap_config
from configs import dpfedemb as dpfedemb_config
from dpjax import privacy
from dpjax import recipes
from dpjax.train import canaries
from dpjax.train import loop


def _config(num_canaries=20, **overrides):
  c = dpcap_config.get_config("tiny")
  c.data.update(num_examples=100, eval_num_examples=32)
  c.train.update(steps=150, batch_size=64, microbatch_size=64, log_every=50,
                 warmup_steps=5, checkpoint_every=1000, learning_rate=3e-3)
  c.evals.update(linear_probe=False, few_shot=False, zero_shot=False,
                 aro=False, captions=0)
  c.privacy.noise_seed = 0
  c.audit.num_canaries = num_canaries
  c.update_from_flattened_dict(overrides)
  return c


def test_included_canaries_are_appended_members_of_the_private_data():
  config = _config()
  phases = list(recipes.get("dpcap").build(config).phases)
  base = phases[0].source
  inserted = canaries.insert(config, phases)
  phase = phases[inserted.phase_index]
  inc = inserted.included
  assert inc.dtype == bool and 0 < inc.sum() < 20
  np.testing.assert_array_equal(inc, privacy.audit.choose_included(20, 0))
  assert len(phase.source) == phase.num_examples == 100 + inc.sum()
  assert phase.source[5]["caption"] == base[5]["caption"]
  got = [phase.source[100 + j]["caption"] for j in range(inc.sum())]
  assert got == [r["caption"] for r, i in zip(inserted.records, inc) if i]
  with pytest.raises(IndexError):
    phase.source[100 + inc.sum()]
  # Deterministic in (num_canaries, seed): a resumed run rebuilds the same
  # dataset; another seed gives other canaries.
  again = canaries.insert(config, list(recipes.get("dpcap").build(config).phases))
  assert [r["caption"] for r in again.records] == [
      r["caption"] for r in inserted.records]
  config.audit.seed = 1
  other = canaries.insert(config, list(recipes.get("dpcap").build(config).phases))
  assert other.records[0]["caption"] != inserted.records[0]["caption"]


def test_no_canaries_by_default_and_clear_errors():
  config = _config(num_canaries=0)
  assert canaries.insert(config, list(recipes.get("dpcap").build(config).phases)) is None
  config = _config(**{"audit.guess_fractions": (0.1, 0.7)})
  with pytest.raises(ValueError, match=r"audit.guess_fractions.*\(0, 0.5\]"):
    canaries.insert(config, list(recipes.get("dpcap").build(config).phases))
  fed = dpfedemb_config.get_config("tiny")
  fed.audit.num_canaries = 10
  with pytest.raises(ValueError, match="audit.num_canaries=10.*'dpfedemb'"):
    canaries.insert(fed, list(recipes.get("dpfedemb").build(fed).phases))


def test_without_noise_the_audit_finds_the_canaries(tmp_path):
  # 100 examples + ~50 canaries, each seen ~60 times: the captioner
  # memorises the inserted random captions and the audit proves it.
  results = loop.run(_config(100, **{"privacy.enabled": False}), str(tmp_path))
  saved = json.load(open(tmp_path / "audit.json"))
  assert saved["theoretical_epsilon"] == float("inf")
  assert saved["empirical_epsilon"] == results["audit/empirical_epsilon"] > 2
  assert saved["mean_loss_inserted"] < saved["mean_loss_left_out"]
  assert "scores" not in json.dumps(saved)  # Aggregates only.
  assert not any(k.startswith("eval/") and "canar" in k for k in results)


def test_dp_run_audit_stays_below_the_accountant(tmp_path):
  results = loop.run(_config(100, **{"train.steps": 40}), str(tmp_path))
  saved = json.load(open(tmp_path / "audit.json"))
  assert saved["delta"] == 1e-6
  # The accountant's epsilon at the bound's delta is reported beside it.
  want = privacy.epsilon(results["dp/noise_multiplier"],
                         results["dp/sampling_rate"], 40, 1e-6)
  assert saved["theoretical_epsilon"] == pytest.approx(want, rel=1e-6)
  inserted = privacy.audit.choose_included(100, 0).sum()
  assert results["dp/num_examples"] == 100 + inserted  # N counts them.
  assert results["delta"] == pytest.approx(1 / (100 + inserted))
  assert saved["empirical_epsilon"] <= saved["theoretical_epsilon"]
