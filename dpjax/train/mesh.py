"""Device mesh ("data", "fsdp") and the shardings of params and batches.

Parameters are replicated by default; with mesh.fsdp > 1 each parameter is
split along its largest dimension divisible by the fsdp axis (FSDP-style).
Batches are split over both axes. The noise draw needs no special care here:
`privacy.privatize` runs on the reduced gradient inside jit and jax's
partitionable threefry gives each coordinate exactly one draw whatever the
sharding.
"""

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


def _leaf_spec(shape, fsdp: int) -> P:
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
    return NamedSharding(mesh, _leaf_spec(np.shape(x), fsdp if floating
                                          else 1))
  return jax.tree.map(one, params)


def batch_sharding(mesh: Mesh, leading_axes: int = 1) -> NamedSharding:
  """Splits the batch axis (after `leading_axes - 1` unsharded axes)."""
  return NamedSharding(mesh, P(*([None] * (leading_axes - 1)), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
