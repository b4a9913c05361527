r"""Paper scale, proven before the pod: `python -m dpjax.plan --config=...`.

Builds the task exactly as `train.loop.run` does (recipe build, privacy
settings, the loop's per-microbatch `accumulate` and `apply` with its sum
function and shardings) from abstract inputs (jax.eval_shape: no params are
materialised, no step runs), AOT-compiles both steps and prints per phase:
parameter count, per-device memory (XLA memory_analysis) against the chip's
HBM, FLOPs per microbatch / logical step / run (XLA cost_analysis), the
Poisson batch tail, steps, examples, epochs, the epsilon the ledger will
reach, projected wall time and chip-hours at a stated MFU, and how long each
step took to compile here (CPU XLA for the simulated devices: an indication
of the jit cost at that size, not the accelerator compiler's time).

  python -m dpjax.plan --config=configs/dpcap.py:tiny --mesh=cpu:8
  python -m dpjax.plan --config=configs/dpcap.py --mesh=v5p-128 --workdir=runs/p

--mesh names chips that need not be here: the steps are compiled for CPU on
min(chips, 8) simulated devices with the per-device microbatch of the real
mesh (same per-device shapes). Memory is CPU-XLA's (TPU/GPU fuse and lay out
differently: a projection, not a measurement of that chip); when mesh.fsdp
exceeds the simulated devices the parameter-state bytes are rescaled
analytically and the output says so. FLOPs are XLA's count of the compiled
per-device program times the number of chips; XLA counts a loop (lax.scan)
once, so train.inner_microbatch scales it by the number of chunks, and a
jaxpr count of the step's matmuls with loops in full (train/flops.py) is
used instead when it is more than twice XLA's. Exits 3 when a phase does not fit, naming the knobs;
the config is never changed.
"""

import os
import sys

SIM_CAP = 8  # most simulated CPU devices compiled for.


def _mesh_arg(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--mesh="):
      return a.split("=", 1)[1]
    if a == "--mesh" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _simulated_env(argv, environ) -> dict | None:
  """The environment for compiling --mesh on simulated CPU devices (None:
  already set, or no --mesh)."""
  from dpjax.train import hardware  # pylint: disable=g-import-not-at-top
  spec = _mesh_arg(argv)
  if not spec or "xla_force_host_platform_device_count" in environ.get(
      "XLA_FLAGS", ""):
    return None
  n = min(hardware.parse_mesh(spec).chips, SIM_CAP)
  env = dict(environ)
  env["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={n}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


if __name__ == "__main__":  # Before jax initialises its backends.
  _env = _simulated_env(sys.argv, os.environ)
  if _env is not None:
    os.environ.update(_env)

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from dpjax import errors
from dpjax import privacy
from dpjax import recipes
from dpjax.train import aot
from dpjax.train import hardware
from dpjax.train import optim
from dpjax.train import phase_plan
from dpjax.train import stand_in

GiB = hardware.GiB
PlanError = aot.PlanError


_MEASURED = {}  # (config json, mesh, local devices) -> _measure's result.


def _measure(config, ms: hardware.MeshSpec) -> dict:
  """Chip-independent numbers: compiled memory and FLOPs, counts, epsilon."""
  local = jax.devices()
  key = (config.to_json_best_effort(sort_keys=True), ms.spec, len(local))
  if key in _MEASURED:
    return _MEASURED[key]
  chips, t, m = ms.chips, config.train, config.mesh
  sim = min(chips, len(local))
  fsdp = m.fsdp
  data = m.data if m.data != -1 else chips // max(fsdp, 1)
  if fsdp < 1 or chips % fsdp or data * fsdp != chips:
    raise PlanError(f"mesh.data={m.data} x mesh.fsdp={fsdp} does not tile "
                    f"the {chips} chips of --mesh={ms.spec}: set mesh.fsdp "
                    "to a divisor and mesh.data=-1")
  try:
    optim.validate_train(t, chips)
  except ValueError as e:
    raise PlanError(str(e)) from e
  per_device = t.microbatch_size // chips
  sim_fsdp = math.gcd(fsdp, sim)
  mesh = aot.devices_mesh(local[:sim], sim_fsdp)
  task = recipes.get(config.recipe).build(config)
  param_shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  notes = []
  if sim < chips:
    notes.append(f"compiled on {sim} simulated devices for {chips} chips: "
                 f"same {per_device} examples per device")
  if sim_fsdp != fsdp:
    notes.append(f"mesh.fsdp={fsdp} > simulated {sim_fsdp}: parameter, "
                 "optimizer and accumulator bytes rescaled analytically")
  inner = t.inner_microbatch
  if inner:
    notes.append(f"train.inner_microbatch={inner}: XLA counts one loop "
                 f"iteration; accumulate FLOPs scaled by {per_device // inner}")
  out = dict(recipe=config.recipe, mesh=ms.spec, chips=chips,
             simulated_devices=sim, compiled_on=local[0].platform,
             params=sum(math.prod(x.shape)
                        for x in jax.tree.leaves(param_shapes)),
             params_per_device=aot.state_bytes(param_shapes, fsdp, jnp.int8),
             microbatch_size=t.microbatch_size,
             per_device_microbatch=per_device, mesh_fsdp=fsdp, notes=notes,
             phases=[])
  for phase in phase_plan.resolve_phases(config, task.phases):
    s = phase.privacy
    (c_acc, c_apply, opt_shapes, micro, jaxpr_dev,
     compile_s) = aot.compile_phase(phase, config, mesh, chips, param_shapes)
    mem_acc, mem_apply = aot.memory(c_acc), aot.memory(c_apply)
    # Param, optimizer and f32 accumulator bytes per device: real mesh.fsdp
    # minus the simulated one (0 unless fsdp exceeds the simulated devices).
    state = lambda f: (aot.state_bytes(param_shapes, f) + aot.state_bytes(
        opt_shapes, f) + aot.state_bytes(param_shapes, f, jnp.float32))
    adjust = state(fsdp) - state(sim_fsdp)
    opt_dev = aot.state_bytes(opt_shapes, fsdp)
    acc_dev = aot.cost(c_acc) * (per_device // inner if inner else 1)
    xla_dev = acc_dev
    if jaxpr_dev > 2 * acc_dev:  # Loops XLA counted once (local steps...).
      acc_dev = jaxpr_dev
      notes.append(f"phase {phase.name}: the jaxpr's matmul FLOPs with loops "
                   f"in full are {jaxpr_dev / xla_dev:.3g}x XLA's count "
                   "(one iteration per loop): the jaxpr count is used")
    apply_dev = aot.cost(c_apply)
    rows = phase.sampler.rows  # > 0: every step reads exactly that many.
    n_micro = (max(1, math.ceil(rows / micro)) if rows else
               aot.expected_microbatches(phase.batch_size, phase.num_examples,
                                         micro))
    tail = rows or phase.batch_size
    if not rows and phase.batch_size < phase.num_examples:
      tail = privacy.max_batch_size_for(phase.num_examples,
                                        phase.sampling_rate, 1e-6)
    step_dev = acc_dev * n_micro + apply_dev
    p = dict(name=phase.name, private=phase.private, steps=phase.steps,
             batch_size=phase.batch_size, num_examples=phase.num_examples,
             batch_size_tail_1e6=tail, microbatches_per_step=n_micro,
             microbatch_size=micro,
             microbatches_tail_1e6=math.ceil(tail / micro),
             examples=phase.steps * phase.batch_size,
             epochs=phase.steps * phase.batch_size / phase.num_examples,
             memory_accumulate=mem_acc, memory_apply=mem_apply,
             optimizer_bytes_per_device=opt_dev, state_bytes_adjust=adjust,
             # The optimizer state is resident (not an argument) while
             # accumulating; apply holds state + accumulator.
             peak_bytes_per_device=max(mem_acc["total"] + opt_dev,
                                       mem_apply["total"]) + adjust,
             step_flops_per_device=step_dev,
             flops_per_microbatch=acc_dev * chips,
             xla_flops_per_microbatch=xla_dev * chips,
             jaxpr_flops_per_microbatch=jaxpr_dev * chips,
             flops_apply=apply_dev * chips, flops_per_step=step_dev * chips,
             flops_run=step_dev * chips * phase.steps,
             compile_seconds=compile_s)
    if s is not None:
      p.update(noise_multiplier=phase.noise_multiplier, delta=s.delta,
               sampling_rate=phase.sampling_rate, accountant=s.accountant)
      if s.is_simulation:
        p["tan_reference_epsilon"] = privacy.epsilon(
            s.tan_reference_noise_multiplier,
            min(1.0, s.tan_reference_batch_size / phase.num_examples),
            phase.steps, s.delta, accountant=s.accountant)
      else:
        p["epsilon"] = phase.mechanism.epsilon()
    out["phases"].append(p)
  _MEASURED[key] = out
  return out


def plan(config, mesh_spec: str | None = None, *, mfu: float = 0.4,
         chip: hardware.Chip | None = None) -> dict:
  """The plan of `config` on `mesh_spec` (None: the local devices).

  Args:
    config: a run config (not modified).
    mesh_spec: e.g. "cpu:8", "v5p-128", "h100x64"; compiled on min(chips,
      local devices) devices with the real per-device microbatch.
    mfu: model FLOP utilisation assumed by the wall-time projection.
    chip: overrides the chip of `mesh_spec` (tests: a tiny HBM).

  Returns:
    A JSON-able dict (see docs/paper_scale.md); "fits" False when a phase
    needs more memory per device than the chip has ("problems" names the
    knobs), in which case `main` exits 3. Compiled numbers are cached per
    (config, mesh), so re-planning for another chip or MFU is cheap.

  Raises:
    PlanError: the mesh or microbatch does not tile the chips.
  """
  local = jax.devices()
  if mesh_spec is None:
    mesh_spec = f"{hardware.chip_key_of(local[0])}:{len(local)}"
  ms = hardware.parse_mesh(mesh_spec)
  chip = chip or ms.chip
  out = json.loads(json.dumps(_measure(config, ms)))  # A private copy.
  target = ("cpu" if ms.chip_key == "cpu" else
            "tpu" if ms.chip_key.startswith("v") else "gpu")
  if out["compiled_on"] != target:
    out["notes"].append(f"memory from {out['compiled_on'].upper()} XLA: a "
                        f"projection for {chip.name}, not a measurement")
  out.update(chip=chip.name, peak_flops_per_chip=chip.peak_flops,
             hbm_per_chip=chip.hbm_bytes, mfu=mfu, problems=[])
  t = config.train
  for p in out["phases"]:
    step_s = hardware.projected_seconds(p["step_flops_per_device"], 1, chip,
                                        mfu)
    p.update(hbm_bytes=chip.hbm_bytes,
             fits=p["peak_bytes_per_device"] <= chip.hbm_bytes,
             step_seconds=step_s, wall_hours=step_s * p["steps"] / 3600,
             chip_hours=step_s * p["steps"] * ms.chips / 3600)
    if not p["fits"]:
      out["problems"].append(
          f"phase {p['name']!r} needs "
          f"{p['peak_bytes_per_device'] / GiB:.2f} GiB per device > "
          f"{chip.hbm_bytes / GiB:.2f} GiB of {chip.name}: lower "
          f"train.microbatch_size (now {t.microbatch_size}: "
          f"{out['per_device_microbatch']} per device), set "
          f"train.inner_microbatch (now {t.inner_microbatch}), raise "
          f"mesh.fsdp (now {out['mesh_fsdp']})" + (
              "" if t.dtype == "bfloat16" else
              f" or use train.dtype=bfloat16 (now {t.dtype})"))
  out["fits"] = not out["problems"]
  for k in ("flops_run", "wall_hours", "chip_hours"):
    out[k] = sum(p[k] for p in out["phases"])
  return out


def _g(x: float) -> str:
  return f"{x:.3g}"


def format_plan(r: dict) -> str:
  """Human-readable lines of a `plan` result."""
  lines = [f"plan: {r['recipe']} on {r['mesh']} = {r['chips']} x "
           f"{r['chip']} ({_g(r['peak_flops_per_chip'])} bf16 FLOP/s, "
           f"{r['hbm_per_chip'] / GiB:.1f} GiB each), MFU {r['mfu']:.0%}",
           f"  params: {r['params']:,} total, {r['params_per_device']:,.0f} "
           f"per device (mesh.fsdp={r['mesh_fsdp']}); microbatch "
           f"{r['microbatch_size']} = {r['per_device_microbatch']} per device"]
  lines += [f"  note: {n}" for n in r["notes"]]
  for p in r["phases"]:
    a, b = p["memory_accumulate"], p["memory_apply"]
    mem = lambda d: (f"args {d['arguments'] / GiB:.2f} + out "
                     f"{d['outputs'] / GiB:.2f} - aliased "
                     f"{d['aliased'] / GiB:.2f} + temps {d['temps'] / GiB:.2f}"
                     f" = {d['total'] / GiB:.2f} GiB")
    lines += [
        f"phase {p['name']} ({'private' if p['private'] else 'public'}): "
        f"{p['steps']:,} steps x batch {p['batch_size']:,} (1e-6 tail "
        f"{p['batch_size_tail_1e6']:,}) = {p['examples']:,} examples, "
        f"{p['epochs']:.2f} epochs of N={p['num_examples']:,}",
        f"  memory/device (XLA): accumulate {mem(a)}; apply {mem(b)}",
        f"  peak/device {p['peak_bytes_per_device'] / GiB:.2f} GiB (incl. "
        f"optimizer state {p['optimizer_bytes_per_device'] / GiB:.2f}) of "
        f"{p['hbm_bytes'] / GiB:.1f} GiB: "
        f"{'fits' if p['fits'] else 'DOES NOT FIT'}",
        f"  FLOPs: {_g(p['flops_per_microbatch'])}/microbatch of "
        f"{p['microbatch_size']:,} x "
        f"{p['microbatches_per_step']:.4g} expected (1e-6 tail "
        f"{p['microbatches_tail_1e6']}) + apply {_g(p['flops_apply'])} = "
        f"{_g(p['flops_per_step'])}/step, {_g(p['flops_run'])}/run "
        f"(microbatch: XLA {_g(p['xla_flops_per_microbatch'])}, jaxpr "
        f"matmuls {_g(p['jaxpr_flops_per_microbatch'])})",
        f"  compile (this host, XLA CPU): accumulate "
        f"{p['compile_seconds']['accumulate']:.1f} s, apply (noise + "
        f"optimizer) {p['compile_seconds']['apply']:.1f} s",
        f"  projected: {p['step_seconds']:.3g} s/step, "
        f"{p['wall_hours']:.3g} h wall, {p['chip_hours']:.4g} chip-hours"]
    if "epsilon" in p:
      lines.append(f"  privacy: sigma {p['noise_multiplier']:.4g}, q "
                   f"{p['sampling_rate']:.3g}, delta {p['delta']:.3g} -> "
                   f"epsilon {p['epsilon']:.4g} ({p['accountant']})")
    elif "tan_reference_epsilon" in p:
      lines.append(f"  TAN simulation (not an epsilon run): reference "
                   f"epsilon {p['tan_reference_epsilon']:.4g}")
  lines.append(f"total: {_g(r['flops_run'])} FLOPs, {r['wall_hours']:.3g} h "
               f"wall, {r['chip_hours']:.4g} chip-hours (projected)")
  lines += [f"DOES NOT FIT: {x}" for x in r["problems"]]
  return "\n".join(lines)


def write_plan(result: dict, workdir: str) -> None:
  """<workdir>/plan.json (local or gs://)."""
  from etils import epath
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "plan.json").write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/dpcap.py:tiny.",
      lock_config=True)
  flags.DEFINE_string("mesh", None, "cpu:8 | v5p-128 | h100x64 | <chip>:<n>"
                      " (default: the local devices).")
  flags.DEFINE_string("workdir", None, "Writes <workdir>/plan.json.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation of projections.")
  flags.DEFINE_list("also", [], "More chips (keys of train/hardware.py's "
                    "CHIPS, e.g. h100) to project the same compiled step on.")
  flags.DEFINE_bool("stand_in_data", True, "Replace real data sources and "
                    "missing vocab files by the :tiny preset's synthetic "
                    "ones (same shapes, N kept): the plan reads no records.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  f = flags.FLAGS
  config, notes = f.config, []
  if f.stand_in_data:
    import importlib.util
    path = config_flags.get_config_filename(f["config"]).split(":")[0]
    spec = importlib.util.spec_from_file_location("_plan_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, notes = stand_in.stand_in_data(config,
                                           module.get_config("tiny"))
  try:
    r = plan(config, f.mesh, mfu=f.mfu)
    r["notes"] += notes
  except errors.ConfigError as e:  # One line and exit 2, as dpjax.main.
    errors.exit_bad_config(e, "dpjax.plan")
  except PlanError as e:
    print(f"dpjax.plan: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  print(format_plan(r), flush=True)
  r["also"] = {}
  for key in f.also:
    o = plan(config, f.mesh, mfu=f.mfu, chip=hardware.CHIPS[key])
    r["also"][key] = {k: o[k] for k in ("chip", "fits", "wall_hours",
                                        "chip_hours", "problems")}
    print(f"also on {r['chips']} x {o['chip']}: {o['wall_hours']:.3g} h "
          f"wall, {o['chip_hours']:.4g} chip-hours, "
          f"{'fits' if o['fits'] else 'DOES NOT FIT'}", flush=True)
  if f.workdir:
    write_plan(r, f.workdir)
  if not r["fits"]:
    print("dpjax.plan: " + "; ".join(r["problems"]), file=sys.stderr,
          flush=True)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main, flags_parser=errors.flags_parser("dpjax.plan"))
