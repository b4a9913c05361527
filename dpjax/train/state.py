"""The TrainState of a run: fresh, on entering a phase, or to restore into.

The noise key of a private phase lives in its step optimizer's state
(`phase_plan.PhasePlan.step_optimizer`), the sampling key in the TrainState;
both are secret (`secrets.run_key`) and kept only in the checkpoint.
"""

import collections

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.errors import ConfigError
from dpjax.train import checkpoint as ckpt_lib
from dpjax.train import mesh as mesh_lib
from dpjax.train import secrets
from dpjax.train import phase_plan
from dpjax.train import step as step_lib
from dpjax.train import task as task_lib


def init_opt(plan: phase_plan.PhasePlan, params, mesh, noise_key,
              first_step: int):
  """The state of `plan.step_optimizer`, placed like the params (same shape
  -> same sharding; keys and counts replicated), so the jitted step never
  sees a new input sharding. The secret key is an argument of the jitted
  init, never a constant compiled into it."""
  init = lambda p, k: plan.step_optimizer(k, first_step).init(p)
  shardings = mesh_lib.param_shardings(
      jax.eval_shape(init, params, noise_key), mesh)
  return jax.jit(init, out_shardings=shardings)(params, noise_key)


def noise_key(config, mesh, secret: bool = True) -> jax.Array:
  """Root of a private phase's noise (`secrets.run_key`: OS entropy from
  process 0 unless config.privacy.noise_seed is set); `secret=False`: a
  placeholder of the same shape, for a state about to be restored."""
  key = secrets.run_key(config.privacy.noise_seed, sampling=False)
  if not secret:
    key = np.zeros_like(key)
  return jax.device_put(jnp.asarray(key), mesh_lib.replicated(mesh))


def init_state(task: task_lib.Task, plan: phase_plan.PhasePlan, config,
               mesh, restoring: bool) -> step_lib.TrainState:
  """Fresh state for the first phase `plan` (keys drawn), or the structure
  of a saved one (`restoring`: no secret drawn; every leaf is then
  restored)."""
  shardings = mesh_lib.param_shardings(
      jax.eval_shape(task.init_params, jax.random.PRNGKey(0)), mesh)
  params = jax.jit(task.init_params, out_shardings=shardings)(
      jax.random.PRNGKey(config.seed))
  if config.init_checkpoint:
    params = load_params(config.init_checkpoint, params)
  opt_state = init_opt(plan, params, mesh,
                       noise_key(config, mesh, not restoring), 0)
  sampling = secrets.run_key(config.privacy.sampling_seed, sampling=True)
  if restoring:
    sampling = np.zeros_like(sampling)
  return step_lib.TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), mesh_lib.replicated(mesh)),
      params=params, opt_state=opt_state,
      sampling_key=jax.device_put(jnp.asarray(sampling),
                                  mesh_lib.replicated(mesh)))


def enter_phase(plan: phase_plan.PhasePlan, state: step_lib.TrainState,
                config, mesh) -> step_lib.TrainState:
  """State on entering phase `plan` after an earlier one: its optimizer
  (and, for a private phase, a fresh noise key), keeping what the recipe's
  `reset_opt_state` keeps of the previous optimizer's state."""
  new = init_opt(plan, state.params, mesh,
                 noise_key(config, mesh, plan.private), int(state.step))
  reset = plan.phase.reset_opt_state
  if reset is not None:
    inner = reset(step_lib.inner_opt_state(state.opt_state),
                                 step_lib.inner_opt_state(new))
    new = collections.OrderedDict(new)  # named_chain's type and order.
    new["optimizer"] = inner  # The noise and EMA: the new ones.
  return state._replace(opt_state=new)


def load_params(path: str, params):
  """Warm start: another run's exported params (<path>/export/params, or
  `path` itself if it is an export dir), else its latest checkpoint."""
  for export in (path, ckpt_lib.export_dir(path)):
    if (epath.Path(export) / "_CHECKPOINT_METADATA").exists():
      return ckpt_lib.load_exported(export, ckpt_lib.abstract_like(params))
  ckpt = ckpt_lib.Checkpointer(path, async_save=False)
  if ckpt.latest_step() is None:
    raise ConfigError(f"config.init_checkpoint={path!r} holds no checkpoint: "
                      "point it at the workdir of a finished run")
  restored = ckpt.restore_params(ckpt_lib.abstract_like(params))
  ckpt.close()
  return restored
