r"""Paper scale, proven before the pod: `python -m dpjax.plan --config=...`.

Builds the task exactly as `train.loop.run` does (recipe build, privacy
settings, the loop's per-microbatch `accumulate` and `apply` with its sum
function and shardings) from abstract inputs (jax.eval_shape: no params are
materialised, no step runs), AOT-compiles both steps and prints per phase:
parameter count, per-device memory (XLA memory_analysis) against the chip's
HBM, FLOPs per microbatch / logical step / run (XLA cost_analysis), the
Poisson batch tail, steps, examples, epochs, the epsilon the ledger will
reach, and projected wall time and chip-hours at a stated MFU.

  python -m dpjax.plan --config=configs/dpcap.py:tiny --mesh=cpu:8
  python -m dpjax.plan --config=configs/dpcap.py --mesh=v5p-128 --workdir=/tmp/p

--mesh names chips that need not be here: the steps are compiled for CPU on
min(chips, 8) simulated devices with the per-device microbatch of the real
mesh (same per-device shapes). Memory is CPU-XLA's (TPU/GPU fuse and lay out
differently: a projection, not a measurement of that chip); when mesh.fsdp
exceeds the simulated devices the parameter-state bytes are rescaled
analytically and the output says so. FLOPs are XLA's count of the compiled
per-device program times the number of chips; loops (lax.scan) count one
iteration, so with train.inner_microbatch the FLOPs are scaled up by the
number of inner chunks. Exits 3 when a phase does not fit, naming the knobs;
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
import functools
import json
import math

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import config_flags
import numpy as np

from dpjax import privacy
from dpjax import recipes
from dpjax.recipes import common
from dpjax.train import flops as flops_lib
from dpjax.train import hardware
from dpjax.train import mesh as mesh_lib
from dpjax.train import secrets
from dpjax.train import stand_in
from dpjax.train import step as step_lib

GiB = hardware.GiB


class PlanError(ValueError):
  """A phase does not fit (or the mesh does not tile): names the knobs."""


def _devices_mesh(devices, fsdp: int) -> Mesh:
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp),
              mesh_lib.BATCH_AXES)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=s),
                      tree, shardings)


def _state_bytes(tree, fsdp: int, dtype=None) -> float:
  """Per-device bytes of a param-like tree under mesh.fsdp = fsdp."""
  total = 0.0
  for x in jax.tree.leaves(tree):
    spec = mesh_lib._leaf_spec(x.shape, fsdp)  # pylint: disable=protected-access
    split = fsdp if any(a is not None for a in spec) else 1
    item = jnp.dtype(dtype or x.dtype).itemsize
    total += math.prod(x.shape) * item / split
  return total


def _example(phase, micro: int, chips: int, sim: int):
  """({field: ShapeDtypeStruct}, mask struct, the phase's global microbatch)
  of one microbatch as the loop's pipeline makes it, with the per-device
  rows of `chips` chips on `sim` simulated devices."""
  if phase.make_batches is not None:  # Its own batches: take one element.
    el = next(phase.make_batches(seed=0, start_step=0, num_steps=1,
                                 global_microbatch=micro, process_index=0,
                                 process_count=1, num_workers=0))
    micro = np.shape(el["mask"])[1]  # A phase may use its own size.
    if micro % chips:
      raise PlanError(f"phase {phase.name!r}: its microbatch of {micro} "
                      f"does not split over {chips} chips")
    rows = micro // chips * sim
    one = lambda x: jax.ShapeDtypeStruct((rows,) + np.shape(x)[2:],
                                         np.asarray(x).dtype)
    return jax.tree.map(one, el["example"]), one(el["mask"]), micro
  from dpjax.data import transforms as transforms_lib
  rows = micro // chips * sim
  rec = transforms_lib.apply(phase.transforms, dict(phase.source[0]),
                             np.random.default_rng(0))
  ex = {k: jax.ShapeDtypeStruct((rows,) + np.shape(v), np.asarray(v).dtype)
        for k, v in rec.items()}
  ex["rng"] = jax.ShapeDtypeStruct((rows, 2), np.uint32)  # add_rng.
  return ex, jax.ShapeDtypeStruct((rows,), np.float32), micro


def expected_microbatches(batch_size: float, num_examples: int,
                          micro: int) -> float:
  """E[max(1, ceil(b / micro))] for the Poisson batch b ~ Binomial(N, q)
  (normal approximation): what the loop runs per step, padding included."""
  q = min(1.0, batch_size / num_examples)
  if q >= 1.0:  # Every example, every step: no randomness.
    return max(1, math.ceil(batch_size / micro))
  sd = math.sqrt(batch_size * (1 - q))
  cdf = lambda x: 0.5 * (1 + math.erf((x - batch_size) / (sd * math.sqrt(2))))
  lo = max(1, math.floor((batch_size - 8 * sd) / micro))
  hi = math.ceil((batch_size + 8 * sd) / micro) + 1
  out = lo * cdf(lo * micro)  # Everything up to lo microbatches.
  for k in range(lo + 1, hi + 1):
    out += k * (cdf(k * micro) - cdf((k - 1) * micro))
  return out


def _cost(compiled) -> float:
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return float((c or {}).get("flops", 0.0))


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             aliased=m.alias_size_in_bytes, temps=m.temp_size_in_bytes)
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] +
                  out["temps"])
  return {k: float(v) for k, v in out.items()}


def _compile_phase(phase, s, config, mesh, chips: int, param_shapes):
  """AOT-compiles the loop's accumulate and apply of `phase` on `mesh`."""
  from dpjax.train import loop  # The loop's own sum function.
  rep = mesh_lib.replicated(mesh)
  params = _abstract(param_shapes, mesh_lib.param_shardings(param_shapes, mesh))
  opt_shapes = jax.eval_shape(phase.optimizer.init, params)
  opt = _abstract(opt_shapes, mesh_lib.param_shardings(opt_shapes, mesh))
  pshard = jax.tree.map(lambda x: x.sharding, params)
  acc_shard = {k: rep for k in step_lib.AUX_KEYS}
  acc_shard["grad"] = pshard
  acc = _abstract(jax.eval_shape(step_lib.zeros_accumulator, params),
                  acc_shard)
  ex, mask, micro = _example(phase, config.train.microbatch_size, chips,
                            mesh.size)
  bspec = lambda x: mesh_lib.batch_sharding(mesh)
  batch = _abstract(ex, jax.tree.map(bspec, ex))
  mask = _abstract(mask, bspec(mask))
  sum_fn = loop._sum_fn(phase, s, config)  # pylint: disable=protected-access
  accumulate = jax.jit(functools.partial(step_lib.accumulate, sum_fn),
                       donate_argnums=(1,), out_shardings=acc_shard)
  c_acc = accumulate.lower(params, acc, batch, mask).compile()
  # All sim devices' matmul FLOPs, loops (lax.scan) counted in full.
  loop_flops = flops_lib.count(functools.partial(step_lib.accumulate, sum_fn),
                               params, acc, batch, mask)
  key = np.asarray(secrets.run_key(0))
  ks = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
  state = step_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
      opt_state=opt, noise_key=ks, sampling_key=ks)
  apply = jax.jit(functools.partial(
      step_lib.apply, optimizer=phase.optimizer, private=phase.private,
      l2_clip_norm=s.l2_clip_norm if s else 0.0,
      noise_multiplier=phase.noise_multiplier,
      expected_batch_size=float(phase.batch_size)), donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda x: x.sharding, state), rep))
  c_apply = apply.lower(state, acc).compile()
  return c_acc, c_apply, opt_shapes, micro, loop_flops / mesh.size


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
    common.validate_train(t, chips)
  except ValueError as e:
    raise PlanError(str(e)) from e
  per_device = t.microbatch_size // chips
  sim_fsdp = math.gcd(fsdp, sim)
  mesh = _devices_mesh(local[:sim], sim_fsdp)
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
             params_per_device=_state_bytes(param_shapes, fsdp, jnp.int8),
             microbatch_size=t.microbatch_size,
             per_device_microbatch=per_device, mesh_fsdp=fsdp, notes=notes,
             phases=[])
  settings = {}
  for phase in task.phases:
    if phase.private:
      settings[phase.name] = common.privacy_from_config(
          config.privacy, num_examples=phase.num_examples,
          batch_size=phase.batch_size, steps=phase.steps)
      phase.noise_multiplier = settings[phase.name].noise_multiplier
  for phase in task.phases:
    s = settings.get(phase.name)
    c_acc, c_apply, opt_shapes, micro, jaxpr_dev = _compile_phase(
        phase, s, config, mesh, chips, param_shapes)
    mem_acc, mem_apply = _memory(c_acc), _memory(c_apply)
    # Param, optimizer and f32 accumulator bytes per device: real mesh.fsdp
    # minus the simulated one (0 unless fsdp exceeds the simulated devices).
    state = lambda f: (_state_bytes(param_shapes, f) + _state_bytes(
        opt_shapes, f) + _state_bytes(param_shapes, f, jnp.float32))
    adjust = state(fsdp) - state(sim_fsdp)
    opt_dev = _state_bytes(opt_shapes, fsdp)
    acc_dev = _cost(c_acc) * (per_device // inner if inner else 1)
    xla_dev = acc_dev
    if jaxpr_dev > 2 * acc_dev:  # Loops XLA counted once (local steps...).
      acc_dev = jaxpr_dev
      notes.append(f"phase {phase.name}: the jaxpr's matmul FLOPs with loops "
                   f"in full are {jaxpr_dev / xla_dev:.3g}x XLA's count "
                   "(one iteration per loop): the jaxpr count is used")
    apply_dev = _cost(c_apply)
    n_micro = expected_microbatches(phase.batch_size, phase.num_examples,
                                    micro)
    tail = phase.batch_size
    if phase.batch_size < phase.num_examples:
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
             flops_run=step_dev * chips * phase.steps)
    if s is not None:
      p.update(noise_multiplier=phase.noise_multiplier, delta=s.delta,
               sampling_rate=phase.sampling_rate, accountant=s.accountant)
      if s.is_simulation:
        p["tan_reference_epsilon"] = privacy.epsilon(
            s.tan_reference_noise_multiplier,
            min(1.0, s.tan_reference_batch_size / phase.num_examples),
            phase.steps, s.delta, accountant=s.accountant)
      else:
        p["epsilon"] = privacy.epsilon(phase.noise_multiplier,
                                       phase.sampling_rate, phase.steps,
                                       s.delta, accountant=s.accountant)
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
    A JSON-able dict (see README, Paper scale); "fits" False when a phase
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
  app.run(main)
