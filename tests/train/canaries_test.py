"""config.audit: canaries enter the private data and the run is audited."""

import json

import ml_collections
import numpy as np
import pytest

from configs import dpcap as dpcap_config
from configs import dpfedemb as dpfedemb_config
from configs import vip as vip_config
from dpjax import privacy
from dpjax import recipes
from dpjax.train import canaries
from dpjax.train import phase_plan


def _config(num_canaries=20, **overrides):
  c = dpcap_config.get_config("tiny")
  c.data.update(num_examples=100, eval_num_examples=32)
  c.train.update(steps=150, batch_size=64, microbatch_size=64, log_every=50,
                 warmup_steps=5, checkpoint_every=1000, learning_rate=3e-3)
  c.evals = ml_collections.ConfigDict(
      {k: c.evals[k] for k in ("heldout_loss", "token_accuracy")})
  c.privacy.noise_seed = 0
  c.audit.num_canaries = num_canaries
  c.update_from_flattened_dict(overrides)
  return c


def test_included_canaries_are_appended_members_of_the_private_data():
  config = _config()
  phases = list(recipes.get("dpcap").build(config).phases)
  base = phases[0].source
  inserted = canaries.insert(config, phases)
  assert phases[0].source is base  # The recipe's phase is not changed.
  phase = phase_plan.resolve_phases(config, phases, inserted)[
      inserted.phase_index]
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
  vip = vip_config.get_config("tiny")
  vip.phases = "pretrain"  # The public warm start only: nothing private.
  vip.audit.num_canaries = 10
  with pytest.raises(ValueError, match="audit.num_canaries=10.*'vip'"):
    canaries.insert(vip, list(recipes.get("vip").build(vip).phases))


def test_without_noise_the_audit_finds_the_canaries(tmp_path):
  # 100 examples + ~50 canaries, each seen ~60 times: the captioner
  # memorises the inserted random captions and the audit proves it.
  results = recipes.run(_config(100, **{"privacy.enabled": False}),
                        str(tmp_path))
  saved = json.load(open(tmp_path / "audit.json"))
  assert saved["theoretical_epsilon"] == float("inf")
  assert saved["empirical_epsilon"] == results["audit/empirical_epsilon"] > 2
  assert saved["mean_score_inserted"] > saved["mean_score_left_out"]
  assert "scores" not in json.dumps(saved)  # Aggregates only.
  assert not any(k.startswith("eval/") and "canar" in k for k in results)


def test_dp_run_audit_stays_below_the_accountant(tmp_path):
  results = recipes.run(_config(100, **{"train.steps": 40}), str(tmp_path))
  saved = json.load(open(tmp_path / "audit.json"))
  assert saved["delta"] == 1e-6
  # The accountant's epsilon at the bound's delta is reported beside it.
  want = privacy.epsilon(results["dp/noise_multiplier"],
                         results["dp/sampling_rate"], 40, 1e-6)
  assert saved["theoretical_epsilon"] == pytest.approx(want, rel=1e-6)
  inserted = privacy.audit.choose_included(100, 0).sum()
  assert results["dp/num_examples"] == 100 + inserted  # N counts them.
  assert results["delta"] == pytest.approx((100 + inserted) ** -1.1)
  assert saved["empirical_epsilon"] <= saved["theoretical_epsilon"]


def _fedemb_config(**overrides):
  c = dpfedemb_config.get_config("tiny")
  c.data.update(num_users=200, public_num_identities=20,
                eval_num_identities=20, eval_num_examples=120)
  c.fedemb.update(users_per_client=4, max_examples_per_user=4,
                  client_batch_size=8, local_classes=4, client_epochs=1,
                  reconst_steps=1)
  c.train.update(steps=3, batch_size=32, microbatch_size=8, log_every=1,
                 checkpoint_every=10)
  c.phases = "dp"
  c.privacy.noise_seed = 0
  c.audit.update(num_canaries=20, guess_fractions=(0.1, 0.25))
  c.update_from_flattened_dict(overrides)
  return c


def test_fedemb_canaries_are_whole_users():
  config = _fedemb_config()
  phases = list(recipes.get("dpfedemb").build(config).phases)
  inserted = canaries.insert(config, phases)
  phase = phase_plan.resolve_phases(config, phases, inserted)[
      inserted.phase_index]
  n_in = int(inserted.included.sum())
  # One canary = one user of 4 images of two glyph identities, one label.
  assert phase.num_examples == phase.source.num_users == 200 + n_in
  assert phase.sampling_rate == pytest.approx(32 / (200 + n_in))
  chosen = [r for r, i in zip(inserted.records, inserted.included) if i]
  for j, rec in enumerate(chosen):
    idx = phase.source.user_indices(200 + j)
    assert len(idx) == 4
    assert {phase.source[i]["identity"] for i in idx} == {rec["identity"]}
    np.testing.assert_array_equal(phase.source[idx[3]]["image"],
                                  rec["images"][3])
  # The loop's rounds sample canary users like any other user.
  it = phase.phase.make_batches(source=phase.source,
                                sampling_rate=phase.sampling_rate,
                                seed=0, start_step=0, num_steps=10,
                                global_microbatch=8, process_index=0,
                                process_count=1, num_workers=0)
  labels = np.concatenate([
      e["example"]["label"][e["example"]["example_mask"] > 0] for e in it])
  assert np.any(labels >= 1 << 30) and np.any(labels < 1 << 30)


def test_fedemb_dp_run_is_audited(tmp_path):
  results = recipes.run(_fedemb_config(), str(tmp_path))
  saved = json.load(open(tmp_path / "audit.json"))
  assert saved["counts"]["num_canaries"] == 20
  assert results["audit/empirical_epsilon"] == saved["empirical_epsilon"]
  assert saved["empirical_epsilon"] <= saved["theoretical_epsilon"]
  assert saved["theoretical_epsilon"] == pytest.approx(privacy.epsilon(
      results["dp/noise_multiplier"], results["dp/sampling_rate"], 3, 1e-6),
      rel=1e-6)
