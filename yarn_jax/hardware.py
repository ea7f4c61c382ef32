"""The accelerators the project knows: peak bf16 FLOP/s and memory bandwidth of each device kind (for MFU
and decoding's memory floor), and the TPU chips and slice shapes `aot` compiles for (Cloud names to jax
topology names)."""

from __future__ import annotations

import dataclasses
from typing import Any

PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


# memory bandwidth in bytes/s by the vendors' datasheets: the floor of memory-bound steps (decoding)
PEAK_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12, "TPU v4": 1.2e12, "TPU v5 lite": 0.82e12,
                  "TPU v5": 2.76e12, "TPU v5p": 2.76e12, "TPU v6 lite": 1.64e12}


def peak_bandwidth(device: Any) -> float | None:
    """Memory bandwidth of a jax device in bytes/s, None for kinds not listed (CPU)."""
    return PEAK_BANDWIDTH.get(device.device_kind)


def peak_flops(device: Any) -> float | None:
    """Peak bf16 FLOP/s of a jax device, None for kinds not listed (CPU)."""
    return PEAK_FLOPS.get(device.device_kind)


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    peak_flops: float  # bf16 FLOP/s per chip
    hbm_bytes: float
    cores_in_name: bool  # Cloud names count TensorCores (v4-8 = 4 chips) rather than chips


CHIPS = {
    "v4": Chip("v4", 275e12, 32 * 2**30, True),
    "v5p": Chip("v5p", 459e12, 95 * 2**30, True),
    "v5e": Chip("v5e", 197e12, 16 * 2**30, False),
    "v6e": Chip("v6e", 918e12, 32 * 2**30, False),
}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def parse_topology(name: str) -> tuple[Chip, int, str]:
    """'v4-128' -> (chip, number of chips, jax topology name 'v4:4x4x4')."""
    kind, _, count = name.replace("v5litepod", "v5e").partition("-")
    if kind not in CHIPS or not count.isdigit():
        raise ValueError(f"--topology: expected one of {sorted(CHIPS)} followed by -N (e.g. v4-64, v5e-16), "
                         f"got {name!r}")
    chip = CHIPS[kind]
    chips = int(count) // 2 if chip.cores_in_name else int(count)
    shapes = _3D if chip.cores_in_name else _2D
    if chips not in shapes:
        sizes = sorted(n * 2 if chip.cores_in_name else n for n in shapes)
        raise ValueError(f"--topology: {name} is not a {kind} slice this tool knows; sizes: {sizes}")
    return chip, chips, f"{kind}:{shapes[chips]}"
