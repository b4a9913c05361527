"""Accelerator table and `--mesh` parsing for `dpjax.plan`.

Peak dense bf16 FLOP/s and memory per chip (one JAX device): vendor data
sheets (TPU: cloud.google.com/tpu/docs/system-architecture; NVIDIA: SXM
data sheets, dense, no sparsity). "cpu" is a nominal figure for projections
only; its memory is the host's RAM shared by the simulated devices.
"""

import dataclasses
import os
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bf16 FLOP/s per chip (one JAX device).
  hbm_bytes: float  # memory per chip.


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB),
    "a100": Chip("NVIDIA A100 80GB", 312e12, 80 * GiB),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80 * GiB),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141e9),
    "cpu": Chip("CPU (nominal)", 1e12, 0.0),  # memory: see host_memory().
}


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """What `--mesh` asks for: `chips` devices of kind `chip`."""
  spec: str
  chip_key: str
  chips: int

  @property
  def chip(self) -> Chip:
    c = CHIPS[self.chip_key]
    if self.chip_key == "cpu":
      return dataclasses.replace(c, hbm_bytes=host_memory() / self.chips)
    return c


def host_memory() -> float:
  try:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return 16.0 * GiB


def parse_mesh(spec: str) -> MeshSpec:
  """"cpu:8" | "<chip>:<n>" | "<chip>x<n>" (h100x64) | "v4-N" / "v5p-N"
  (TensorCores: N/2 chips, as Cloud TPU names slices) | "v5e-N" (chips).

  Raises:
    ValueError: unknown chip or malformed count, listing the valid forms.
  """
  s = spec.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+?)(?:[:x]|-)(\d+)", s)
  if m is None or m.group(1) not in CHIPS:
    raise ValueError(
        f"--mesh={spec!r}: use <chip>:<n>, <chip>x<n> or a Cloud TPU slice "
        f"name (v5p-128); chips: {sorted(CHIPS)}")
  key, n = m.group(1), int(m.group(2))
  if "-" in s and key in ("v4", "v5p"):  # Slice names count TensorCores.
    if n % 2:
      raise ValueError(f"--mesh={spec!r}: {key} slices have an even number "
                       "of TensorCores (2 per chip)")
    n //= 2
  if n < 1:
    raise ValueError(f"--mesh={spec!r}: need at least one chip")
  return MeshSpec(spec, key, n)


def chip_key_of(device) -> str:
  """The CHIPS key of a local jax device ("cpu" when unknown)."""
  kind = f"{device.platform} {getattr(device, 'device_kind', '')}".lower()
  for key in sorted(CHIPS, key=len, reverse=True):
    if key != "cpu" and re.search(rf"\b{key}", kind.replace(" lite", "e")):
      return key
  return "cpu"


def projected_seconds(flops: float, chips: int, chip: Chip,
                      mfu: float) -> float:
  """Wall seconds for `flops` on `chips` chips at model FLOP utilisation."""
  return flops / (chips * chip.peak_flops * mfu)
