"""dpjax.plan: AOT plan of a tiny DP-Cap on 8 simulated devices.

(a) the fields (params, memory, FLOPs, Poisson tail, epsilon, projections,
plan.json); (b) FLOPs per logical step against 6 x params x tokens and
against XLA's count of a plain (unclipped, unsharded) gradient step; (c) a
chip too small fails naming the knobs; a mesh that does not tile fails
naming mesh.fsdp. One compile (~30 s on 2 cores), cached across the tests.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpcap as dpcap_config
from configs import dpfedemb as dpfedemb_config
from dpjax import plan as plan_lib
from dpjax import privacy
from dpjax import recipes
from dpjax.train import aot
from dpjax.train import flops as flops_lib
from dpjax.train import hardware
from dpjax.train import phase_plan
from dpjax.train import stand_in

MICRO = 64


def _config():
  c = dpcap_config.get_config("tiny")
  c.privacy.noise_multiplier = 1.0  # No calibration (seconds of PLD).
  c.train.update(dict(steps=50, microbatch_size=MICRO, batch_size=512))
  return c


@pytest.fixture(scope="module")
def result():
  return plan_lib.plan(_config(), "cpu:8", mfu=0.4)


def test_parse_mesh():
  assert hardware.parse_mesh("v5p-128").chips == 64  # TensorCores / 2.
  assert hardware.parse_mesh("h100x64").chips == 64
  assert hardware.parse_mesh("cpu:8").chip_key == "cpu"
  assert hardware.parse_mesh("v5e-16").chips == 16
  with pytest.raises(ValueError, match="chips"):
    hardware.parse_mesh("tpu9000:4")


def test_loop_flops_counted_in_full():
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  body = lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None,
                                length=10)[0]
  assert flops_lib.count(body, x) == 10 * 2 * 64 ** 3


def test_stand_in_data():
  paper = dpcap_config.get_config("paper")
  c, notes = stand_in.stand_in_data(paper, dpcap_config.get_config("tiny"))
  assert c.data.source == "synthetic:shapes" and paper.data.source != (
      c.data.source)
  assert c.data.num_examples == paper.data.num_examples
  assert c.data.image_size == 224 and c.model.vocab_size == 30522
  assert c.privacy.delta == paper.privacy.delta
  assert any("data.source=" in n for n in notes)
  # A real-data-only field beside a replaced user-keyed source takes the
  # stand-in's value (synthetic identities refuse a held-out fraction).
  paper = dpfedemb_config.get_config("paper")
  assert paper.data.heldout_user_fraction > 0
  c, notes = stand_in.stand_in_data(paper, dpfedemb_config.get_config("tiny"))
  assert c.data.heldout_user_fraction == 0.0
  assert any("data.heldout_user_fraction" in n for n in notes)


def test_fields(result, tmp_path):
  c = _config()
  task = recipes.get("dpcap").build(c)
  shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert result["params"] == n
  assert result["params_per_device"] == n  # mesh.fsdp = 1: replicated.
  assert result["chips"] == 8 and result["simulated_devices"] == 8
  assert result["per_device_microbatch"] == MICRO // 8
  assert result["fits"] and not result["problems"]
  (p,) = result["phases"]
  assert p["name"] == "dp" and p["private"]
  assert p["steps"] == 50 and p["batch_size"] == 512
  assert p["examples"] == 50 * 512
  assert p["epochs"] == pytest.approx(50 * 512 / 50_000)
  # E[ceil(b / M)] of the Poisson batch b: 8 or 9 microbatches of 64.
  assert p["microbatches_per_step"] == pytest.approx(
      aot.expected_microbatches(512, 50_000, MICRO))
  assert 8 < p["microbatches_per_step"] < 9
  assert aot.expected_microbatches(256, 19_800, 512) == pytest.approx(1)
  assert aot.expected_microbatches(256, 256, 32) == 8
  assert p["batch_size_tail_1e6"] == privacy.max_batch_size_for(
      50_000, 512 / 50_000, 1e-6) > 512
  assert p["microbatches_tail_1e6"] == math.ceil(p["batch_size_tail_1e6"]
                                                 / MICRO)
  for key in ("memory_accumulate", "memory_apply"):
    m = p[key]
    assert m["total"] == pytest.approx(m["arguments"] + m["outputs"] -
                                       m["aliased"] + m["temps"])
    assert m["arguments"] > 0
  # Arguments of apply hold at least the f32 params and the accumulator.
  assert p["memory_apply"]["arguments"] >= 2 * 4 * n
  assert 0 < p["peak_bytes_per_device"] < p["hbm_bytes"]
  assert p["flops_per_step"] == pytest.approx(
      p["flops_per_microbatch"] * p["microbatches_per_step"] +
      p["flops_apply"])
  assert p["flops_run"] == pytest.approx(50 * p["flops_per_step"])
  chip = hardware.CHIPS["cpu"]
  assert p["step_seconds"] == pytest.approx(
      p["flops_per_step"] / 8 / (chip.peak_flops * 0.4))
  assert p["chip_hours"] == pytest.approx(p["step_seconds"] * 50 * 8 / 3600)
  assert p["epsilon"] == pytest.approx(privacy.epsilon(
      1.0, 512 / 50_000, 50, p["delta"]))
  assert set(p["compile_seconds"]) == {"accumulate", "apply"}
  assert all(v > 0 for v in p["compile_seconds"].values())
  text = plan_lib.format_plan(result)
  for s in ("params: ", "fits", "FLOPs: ", "jaxpr", "epsilon", "chip-hours",
            "compile (this host"):
    assert s in text
  # Another chip reuses the compiled numbers (no second compile).
  v5p = plan_lib.plan(_config(), "cpu:8", chip=hardware.CHIPS["v5p"])
  assert v5p["phases"][0]["flops_per_step"] == p["flops_per_step"]
  plan_lib.write_plan(result, str(tmp_path / "w"))
  saved = json.loads((tmp_path / "w" / "plan.json").read_text())
  assert saved["phases"][0]["flops_per_step"] == p["flops_per_step"]


def _stride(params) -> int:
  enc = params["encoder"]
  names = [k for k in enc if k.startswith("stem_") and "norm" not in k]
  return math.prod(enc[k]["kernel"].shape[0] for k in names + ["patch_embed"])


def test_flops_agree(result):
  c = _config()
  task = recipes.get("dpcap").build(c)
  (phase,) = task.phases
  shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))
  patches = (c.data.image_size // _stride(shapes)) ** 2
  tokens = c.data.max_caption_len - 1
  # Forward + backward ~ 6 x params x tokens they touch, per example.
  per_example = 6 * (count(shapes["encoder"]) * patches +
                     count(shapes["decoder"]) * tokens)
  p = result["phases"][0]
  analytic = per_example * MICRO * p["microbatches_per_step"]
  assert 0.5 < p["flops_per_step"] / analytic < 2.0, (
      p["flops_per_step"], analytic)
  # XLA's count of a plain unclipped gradient of the same microbatch.
  ex, _, _ = aot.example_structs(
      phase_plan.resolve_phases(c, [phase])[0], MICRO, 1, 1)

  def plain(params, batch):
    loss = lambda q: jnp.sum(jax.vmap(phase.loss_fn, (None, 0))(q, batch))
    return jax.grad(loss)(params)

  xla = aot.cost(jax.jit(plain).lower(shapes, ex).compile())
  # The jaxpr count (matmuls, loops in full) agrees with XLA's here (no
  # loops), so the XLA number is the one used.
  assert 0.5 < p["jaxpr_flops_per_microbatch"] / p[
      "xla_flops_per_microbatch"] < 2.0
  assert p["flops_per_microbatch"] == p["xla_flops_per_microbatch"]
  ratio = p["flops_per_microbatch"] / xla
  assert 0.5 < ratio < 2.0, (p["flops_per_microbatch"], xla)


def test_does_not_fit_names_knobs(result):
  del result  # Compiled numbers cached: this re-plans for a tiny chip.
  tiny = hardware.Chip("tiny", 1e12, 1024.0)
  r = plan_lib.plan(_config(), "cpu:8", chip=tiny)
  assert not r["fits"] and not r["phases"][0]["fits"]
  (msg,) = r["problems"]
  for knob in ("train.microbatch_size", "train.inner_microbatch",
               "mesh.fsdp", "train.dtype"):
    assert knob in msg
  assert "DOES NOT FIT" in plan_lib.format_plan(r)
  c = _config()
  c.mesh.fsdp = 3
  with pytest.raises(plan_lib.PlanError, match="mesh.fsdp"):
    plan_lib.plan(c, "cpu:8")
  c = _config()
  c.train.microbatch_size = 60
  with pytest.raises(plan_lib.PlanError, match="train.microbatch_size"):
    plan_lib.plan(c, "cpu:8")
  assert np.isfinite(r["chip_hours"])
