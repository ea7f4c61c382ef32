"""A per-device attention function run inside `shard_map` over the mesh (the model's only shard_map)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

BATCH_AXES, HEAD_AXIS = ("data", "fsdp"), "tensor"


def per_device(kernel: Callable[..., jax.Array], mesh: Mesh, seq_axis: str | None = None) -> Callable[..., jax.Array]:
    """`kernel` (the attention signature of yarn_jax.attention) run inside shard_map: batch split over
    data x fsdp, heads over tensor, the sequence over `seq_axis` (None: whole). Segment ids None stay None
    (one document per row)."""
    qkv = PartitionSpec(BATCH_AXES, seq_axis, HEAD_AXIS, None)
    ids = PartitionSpec(BATCH_AXES, seq_axis)

    def attend(q, k, v, q_seg, kv_seg, q_idx, kv_idx):
        if q_seg is None:
            fn = lambda q, k, v, qi, ki: kernel(q, k, v, None, None, qi, ki)  # noqa: E731
            return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, ids, ids), out_specs=qkv,
                                 check_vma=False)(q, k, v, q_idx, kv_idx)
        return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, ids, ids, ids, ids), out_specs=qkv,
                             check_vma=False)(q, k, v, q_seg, kv_seg, q_idx, kv_idx)

    return attend
