"""Device mesh ("data", "fsdp") and the shardings of params and batches.

Parameters are replicated by default; with mesh.fsdp > 1 each parameter is
split along its largest dimension divisible by the fsdp axis (FSDP-style).
Batches are split over both axes; `to_global_array` places a process's
numpy share of a batch on the mesh. The noise draw needs no special care here:
`privacy.privatize` runs on the reduced gradient inside jit and jax's
partitionable threefry gives each coordinate exactly one draw whatever the
sharding.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpjax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """Builds a 2-D mesh over all (global) devices.

  Args:
    data: data-parallel size; -1 = all devices / fsdp.
    fsdp: parameter-sharding size.

  Raises:
    ValueError: naming mesh.data / mesh.fsdp if they do not tile the devices.
  """
  n = jax.device_count()
  if data == -1:
    if n % fsdp:
      raise ConfigError(f"config.mesh.fsdp={fsdp} does not divide the {n} "
                        "devices; "
                        "set mesh.fsdp to a divisor")
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f"config.mesh.data={data} x mesh.fsdp={fsdp} != {n} "
                      "devices; "
                      "set mesh.data=-1 to use all devices")
  devices = np.asarray(jax.devices()).reshape(data, fsdp)
  return Mesh(devices, BATCH_AXES)


def leaf_spec(shape, fsdp: int) -> P:
  """PartitionSpec of one leaf: its largest dim divisible by `fsdp` is split
  over the "fsdp" axis; replicated if none is (or fsdp == 1)."""
  if fsdp > 1:
    for dim in np.argsort(shape)[::-1]:
      if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
        spec = [None] * len(shape)
        spec[dim] = "fsdp"
        return P(*spec)
  return P()


def param_shardings(params, mesh: Mesh):
  """NamedSharding per leaf: replicated, or FSDP-split when mesh has fsdp.

  Integer leaves (the noise transform's PRNG key and step counts in an
  optimizer state) are always replicated."""
  fsdp = mesh.shape["fsdp"]

  def one(x):
    floating = np.issubdtype(np.dtype(x.dtype), np.floating) or (
        str(x.dtype) == "bfloat16")
    return NamedSharding(mesh, leaf_spec(np.shape(x), fsdp if floating
                                         else 1))
  return jax.tree.map(one, params)


def batch_sharding(mesh: Mesh, leading_axes: int = 1) -> NamedSharding:
  """Splits the batch axis (after `leading_axes - 1` unsharded axes)."""
  return NamedSharding(mesh, P(*([None] * (leading_axes - 1)), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global_array(local: Any, mesh: Any, partition_spec: Any = None,
                    batch_axis: int | None = None) -> Any:
  """This process's numpy share (any pytree) -> global jax.Arrays.

  Each leaf with ndim > batch_axis becomes an array whose ``batch_axis``
  is process_count times longer (the processes' shares concatenated in
  process order), sharded by ``NamedSharding(mesh, partition_spec)``.
  Default spec ``P("data")``; default ``batch_axis`` is the position of the
  spec's first non-None entry (so one microbatch ``element["example"]``
  sliced at m, leaves [M/P, ...], with ``P("data")``; or a whole element's
  [n_micro, M/P, ...] leaves with ``P(None, "data")``). Lower-rank leaves
  (0-d metadata "step", "batch_size") pass through as Python scalars.
  """
  spec = partition_spec if partition_spec is not None else P("data")
  if batch_axis is None:
    batch_axis = next((i for i, a in enumerate(spec) if a is not None), 0)
  sharding = NamedSharding(mesh, spec)

  def convert(v):
    v = np.asarray(v)
    if v.ndim <= batch_axis:
      return v.item() if v.ndim == 0 else v
    shape = list(v.shape)
    shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, v, tuple(shape))

  return jax.tree.map(convert, local)
