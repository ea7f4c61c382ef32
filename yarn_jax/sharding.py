"""The device mesh ('data', 'fsdp', 'seq', 'tensor') and the one table mapping logical axes onto it.

Modules name logical axes only (llama.py); `RULES` decides where each goes. Flax resolves rules in order
and skips mesh axes already used by an earlier dimension of the same array, so 'embed' shards
parameters over fsdp x seq (ZeRO-3 over every chip that holds the same weights: the ring's chips too)
while activations, whose batch already took 'fsdp' and sequence 'seq', keep D whole.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "seq", "tensor")
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "seq"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "seq")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(*, devices: list[Any] | None = None, **axes: int) -> Mesh:
    """A mesh over `devices` (default: all, of every process) with axis sizes `axes` (data, fsdp, seq,
    tensor; missing ones are 1). One axis may be -1: "the rest"."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown}; the mesh axes are {list(AXES)}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = {name: axes.get(name, 1) for name in AXES}
    for name, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n != -1):
            raise ValueError(f"mesh.{name}: expected a positive integer or -1, got {n!r}")
    rest = [k for k, n in sizes.items() if n == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {rest}")
    known = math.prod(n for n in sizes.values() if n != -1)
    if rest:
        if len(devices) % known:
            raise ValueError(f"mesh.{rest[0]}: the other axes multiply to {known}, which does not divide the "
                             f"{len(devices)} devices")
        sizes[rest[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh: data*fsdp*seq*tensor = {math.prod(sizes.values())} but there are "
                         f"{len(devices)} devices")
    shape = tuple(sizes[a] for a in AXES)
    try:  # topology-aware placement on TPU/GPU; CPU devices have no topology
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - fall back to the given order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def rules_context(mesh: Mesh):
    """The context in which the model's logical activation constraints resolve on `mesh` (enter it
    around tracing: jit, lower, or the first call of a jitted function)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(mesh)
    stack.enter_context(nn.logical_axis_rules(RULES))
    return stack


def logical_sharding(mesh: Mesh, axes: tuple[str | None, ...] | PartitionSpec) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), RULES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, T] inputs: batch over data x fsdp, sequence over seq."""
    return logical_sharding(mesh, ("batch", "seq"))


def check_batch(mesh: Mesh, batch: int, seq_len: int) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % dp:
        raise ValueError(f"batch: expected a multiple of data*fsdp = {dp}, got {batch}")
    if seq_len % mesh.shape["seq"]:
        raise ValueError(f"seq_len: expected a multiple of the seq axis ({mesh.shape['seq']}), got {seq_len}")
