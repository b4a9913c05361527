"""Abstract inputs and AOT compilation of the loop's steps (dpjax.plan).

The accumulate and apply steps of `train.loop` are compiled from
ShapeDtypeStructs carrying the loop's shardings: no parameter is
materialised and no step runs.
"""

import functools
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from dpjax.train import flops as flops_lib
from dpjax.train import mesh as mesh_lib
from dpjax.train import secrets
from dpjax.train import step as step_lib


class PlanError(ValueError):
  """A phase does not fit (or the mesh does not tile): names the knobs."""


def devices_mesh(devices, fsdp: int) -> Mesh:
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp),
              mesh_lib.BATCH_AXES)


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=s),
                      tree, shardings)


def state_bytes(tree, fsdp: int, dtype=None) -> float:
  """Per-device bytes of a param-like tree under mesh.fsdp = fsdp."""
  total = 0.0
  for x in jax.tree.leaves(tree):
    spec = mesh_lib.leaf_spec(x.shape, fsdp)
    split = fsdp if any(a is not None for a in spec) else 1
    item = jnp.dtype(dtype or x.dtype).itemsize
    total += math.prod(x.shape) * item / split
  return total


def example_structs(phase, micro: int, chips: int, sim: int):
  """({field: ShapeDtypeStruct}, mask struct, the phase's global microbatch)
  of one microbatch as the loop's pipeline makes it, with the per-device
  rows of `chips` chips on `sim` simulated devices."""
  if phase.phase.make_batches is not None:  # Its own: take one element.
    el = next(phase.phase.make_batches(
        source=phase.source, sampling_rate=phase.sampling_rate, seed=0,
        start_step=0, num_steps=1, global_microbatch=micro, process_index=0,
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
  rec = transforms_lib.apply(phase.phase.transforms, dict(phase.source[0]),
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


def cost(compiled) -> float:
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return float((c or {}).get("flops", 0.0))


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             aliased=m.alias_size_in_bytes, temps=m.temp_size_in_bytes)
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] +
                  out["temps"])
  return {k: float(v) for k, v in out.items()}


def compile_phase(phase, config, mesh, chips: int, param_shapes):
  """AOT-compiles the loop's accumulate and apply of `phase` (a
  `train.phase_plan.PhasePlan`: its sum function and step optimizer) on
  `mesh`. Returns (compiled accumulate, compiled apply, optimizer state
  shapes, per-device microbatch, jaxpr matmul FLOPs per device, {"accumulate":
  s, "apply": s} seconds to lower + compile each on this host)."""
  rep = mesh_lib.replicated(mesh)
  params = abstract(param_shapes, mesh_lib.param_shardings(param_shapes, mesh))
  key = np.asarray(secrets.run_key(0))
  opt_shapes = jax.eval_shape(
      lambda p, k: phase.step_optimizer(k).init(p), params,
      jax.ShapeDtypeStruct(key.shape, key.dtype))
  opt = abstract(opt_shapes, mesh_lib.param_shardings(opt_shapes, mesh))
  pshard = jax.tree.map(lambda x: x.sharding, params)
  acc_shard = {k: rep for k in step_lib.AUX_KEYS}
  acc_shard["grad"] = pshard
  acc = abstract(jax.eval_shape(step_lib.zeros_accumulator, params),
                  acc_shard)
  ex, mask, micro = example_structs(phase, config.train.microbatch_size, chips,
                            mesh.size)
  bspec = lambda x: mesh_lib.batch_sharding(mesh)
  batch = abstract(ex, jax.tree.map(bspec, ex))
  mask = abstract(mask, bspec(mask))
  sum_fn = phase.sum_fn
  accumulate = jax.jit(functools.partial(step_lib.accumulate, sum_fn),
                       donate_argnums=(1,), out_shardings=acc_shard)
  t0 = time.perf_counter()
  c_acc = accumulate.lower(params, acc, batch, mask).compile()
  seconds = {"accumulate": time.perf_counter() - t0}
  # All sim devices' matmul FLOPs, loops (lax.scan) counted in full.
  loop_flops = flops_lib.count(functools.partial(step_lib.accumulate, sum_fn),
                               params, acc, batch, mask)
  ks = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
  state = step_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
      opt_state=opt, sampling_key=ks)
  apply = jax.jit(functools.partial(
      step_lib.apply, optimizer=phase.step_optimizer()), donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda x: x.sharding, state), rep))
  t0 = time.perf_counter()
  c_apply = apply.lower(state, acc).compile()
  seconds["apply"] = time.perf_counter() - t0
  return c_acc, c_apply, opt_shapes, micro, loop_flops / mesh.size, seconds
