"""The device mesh ('data', 'fsdp', 'seq', 'tensor') and the one table mapping logical axes onto it.

Modules name logical axes only (llama.py); `RULES` decides where each goes. Flax resolves rules in order
and skips mesh axes already used by an earlier dimension of the same array, so 'embed' shards
parameters over fsdp x seq (ZeRO-3 over every chip that holds the same weights: the ring's chips too)
while activations, whose batch already took 'fsdp' and sequence 'seq', keep D whole. Parameters get
their shardings from `logical_sharding`; activations are pinned by `constrain(x, mesh, axes)`, the mesh
passed by the caller (the model holds it), so there is no rules context to enter around tracing.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """The run config's `mesh`: the size of each axis; one axis may be -1, "the rest of the devices"."""

    data: int = 1  # data parallel: parameters replicated
    fsdp: int = 1  # data parallel with parameters and optimizer state sharded (ZeRO-3)
    seq: int = 1  # the sequence split over a ring (ring attention)
    tensor: int = 1  # heads and the MLP's hidden units split (Megatron)

    def __post_init__(self):
        for name in AXES:
            n = getattr(self, name)
            if not isinstance(n, int) or isinstance(n, bool) or (n < 1 and n != -1):
                raise ValueError(f"mesh.{name}: expected a positive integer or -1, got {n!r}")
        rest = [name for name in AXES if getattr(self, name) == -1]
        if len(rest) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {rest}")

    @classmethod
    def of(cls, axes: Any) -> MeshShape:
        """From a mapping of axis sizes (the run config's `mesh`; missing axes are 1)."""
        axes = dict(axes)
        unknown = sorted(set(axes) - set(AXES))
        if unknown:
            raise ValueError(f"mesh: unknown axis {unknown}; the mesh axes are {list(AXES)}")
        return cls(**axes)

    def sizes(self, devices: int) -> dict[str, int]:
        """Every axis' size over `devices` devices (-1 resolved)."""
        sizes = {name: getattr(self, name) for name in AXES}
        known = math.prod(n for n in sizes.values() if n != -1)
        rest = [name for name, n in sizes.items() if n == -1]
        if rest:
            if devices % known:
                raise ValueError(f"mesh.{rest[0]}: the other axes multiply to {known}, which does not divide the "
                                 f"{devices} devices")
            sizes[rest[0]] = devices // known
        if math.prod(sizes.values()) != devices:
            raise ValueError(f"mesh: data*fsdp*seq*tensor = {math.prod(sizes.values())} but there are "
                             f"{devices} devices")
        return sizes

    def build(self, devices: list[Any] | None = None) -> Mesh:
        """The mesh over `devices` (default: all, of every process), placed by the topology where it has one."""
        devices = list(jax.devices() if devices is None else devices)
        shape = tuple(self.sizes(len(devices)).values())
        try:  # topology-aware placement on TPU/GPU; CPU devices have no topology
            grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
        except Exception:  # noqa: BLE001 - fall back to the given order
            grid = np.asarray(devices).reshape(shape)
        return Mesh(grid, AXES)


def make_mesh(*, devices: list[Any] | None = None, **axes: int) -> Mesh:
    """A mesh over `devices` (default: all) with axis sizes `axes` (data, fsdp, seq, tensor; missing ones
    are 1, one may be -1): `MeshShape.of(axes).build(devices)`."""
    return MeshShape.of(axes).build(devices)


def spec(axes: tuple[str | None, ...] | PartitionSpec) -> PartitionSpec:
    """The mesh PartitionSpec of logical `axes`, by RULES."""
    return nn.logical_to_mesh_axes(tuple(axes), RULES)


SEQ_AXIS: str = spec(("seq",))[0]  # the mesh axis RULES split the sequence over (ring attention's)


def ring_size(mesh: Mesh | None) -> int:
    """How many devices one sequence is split over (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[SEQ_AXIS]


def logical_sharding(mesh: Mesh, axes: tuple[str | None, ...] | PartitionSpec,
                     shape: tuple[int, ...] | None = None) -> NamedSharding:
    """The sharding of logical `axes` on `mesh` (by RULES). With `shape` (an array that must exist whole on
    the mesh: parameters), a dimension that its mesh axes do not divide (a vocabulary of 32001 over
    tensor = 2) drops axes from the last until they do, down to none: replicated over those axes rather
    than refused (jax shards arrays only evenly)."""
    mesh_spec = spec(axes)
    if shape is None:
        return NamedSharding(mesh, mesh_spec)
    fitted = []
    for dim, names in zip(shape, tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec)), strict=True):
        names = list((names,) if isinstance(names, str) else names or ())
        while names and dim % math.prod(mesh.shape[n] for n in names):
            names.pop()
        fitted.append(tuple(names) if len(names) > 1 else names[0] if names else None)
    return NamedSharding(mesh, PartitionSpec(*fitted))


def constrain(x: jax.Array, mesh: Mesh | None, axes: tuple[str | None, ...]) -> jax.Array:
    """`x` constrained to the sharding of its logical `axes` on `mesh` (by RULES); unchanged without a mesh."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, logical_sharding(mesh, axes))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, T] inputs: batch over data x fsdp, sequence over seq."""
    return logical_sharding(mesh, ("batch", "seq"))


def check_batch(mesh: Mesh, batch: int, seq_len: int) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % dp:
        raise ValueError(f"batch: expected a multiple of data*fsdp = {dp}, got {batch}")
    if seq_len % ring_size(mesh):
        raise ValueError(f"seq_len: expected a multiple of the seq axis ({ring_size(mesh)}), got {seq_len}")
