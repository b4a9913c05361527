"""Orbax checkpoints of the whole run: TrainState + ledger + data position.

One `CheckpointManager` item "state" holds the TrainState pytree (params,
optimizer state, step, noise key) with its shardings; item "meta" is JSON:
the privacy ledger (every private step's mechanism, delta, accountant), the
Grain iterator state, the phase and its step, and what the guarantee rests
on as it ran (`as_run.py`: whether each key in use was secret, each phase's
facts and steps). A resumed run therefore continues the same noise keys,
the same Poisson batch sequence and the same privacy account, and reports
what ran. Works with any path Orbax/tensorstore
accepts (local, gs://...).

The checkpoints hold both secret keys, so a local `checkpoints/` is
owner-only whatever the umask (`dpjax.private_files`): created 0700 before
Orbax writes into it (nothing below a 0700 folder is reachable by others),
step folders 0700 through Orbax's `path_permission_mode`, and every entry
below set to 0700 / 0600 once each save has finished (`wait`, `close`, and
before the next save). A bucket's checkpoints are protected by the bucket's
access control (PRIVACY.md).
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpjax import private_files


class Checkpointer:
  """Saves/restores (state, meta) under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    path = workdir.rstrip("/") + "/checkpoints"
    local = private_files.is_local(path)
    if local:
      path = os.path.abspath(path)
    self._path = private_files.make_private_dir(path)
    # Buckets take no `mode=` (etils' gfile backend refuses one).
    modes = ocp.options.FileOptions(
        path_permission_mode=private_files.DIR_MODE if local else None)
    self._manager = ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save, file_options=modes),
        # Handlers declared up front (not deferred to the first save), so a
        # fresh Checkpointer can read item metadata (restore_params/_numpy).
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           meta=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False):
    """Saves asynchronously; call `wait()` before exiting."""
    # Orbax waits for the previous save here anyway: restrict what it wrote.
    self.wait()
    self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores (state, meta) at `step` (default latest) onto the shardings
    of `abstract_state` (a pytree of jax.ShapeDtypeStruct with .sharding)."""
    step = self._manager.latest_step() if step is None else step
    out = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int | None = None) -> dict:
    """The JSON item alone (phase, ledger, data state) at `step`/latest."""
    step = self._manager.latest_step() if step is None else step
    return self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _saved_tree(self, step: int) -> Any:
    """The saved state's metadata tree (leaves have .shape, .dtype)."""
    meta = self._manager.item_metadata(step)["state"]
    return getattr(meta, "tree", meta)  # orbax TreeMetadata -> plain tree.

  def restore_params(self, abstract_params: Any) -> Any:
    """Only the params of the latest checkpoint (warm starts), placed like
    `abstract_params` (the rest of the saved state is read and dropped)."""
    step = self._manager.latest_step()
    meta = self._saved_tree(step)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(  # Read onto one device whatever saved it.
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    abstract = dict(abstract) if isinstance(abstract, dict) else abstract
    abstract["params"] = abstract_params
    out = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
    return out["state"]["params"]

  def restore_numpy(self, step: int | None = None):
    """(state, meta) at `step`/latest with every array as a host numpy
    array, whatever mesh or process count saved it (analysis, tests)."""
    step = self._manager.latest_step() if step is None else step
    meta = self._saved_tree(step)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    state, meta = self.restore(abstract, step)
    return jax.tree.map(np.asarray, state), meta

  def wait(self):
    """Waits for the save in flight; then every entry is owner-only."""
    self._manager.wait_until_finished()
    private_files.restrict_tree(self._path)

  def close(self):
    self._manager.close()
    private_files.restrict_tree(self._path)


def _abs(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def export_dir(workdir: str, name: str = "params") -> str:
  return workdir.rstrip("/") + "/export/" + name


def export_params(workdir: str, params: Any, name: str = "params") -> str:
  """Writes `params` alone (no keys, no optimizer state) to
  <workdir>/export/<name> ("params"; "ema_params": the EMA), replacing an
  earlier export; returns the path.
  Call on every process (Orbax gathers sharded arrays)."""
  path = _abs(export_dir(workdir, name))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  return path


def load_exported(path: str, abstract_params: Any) -> Any:
  """Params written by `export_params` (path: the export/params dir),
  placed like `abstract_params`."""
  ckptr = ocp.StandardCheckpointer()
  out = ckptr.restore(_abs(path), abstract_params)
  ckptr.close()
  return out


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStruct pytree (with shardings) describing `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)
