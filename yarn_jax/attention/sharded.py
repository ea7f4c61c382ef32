"""Attention inside `shard_map`: its inputs' specs, laid out as the model's activations (by sharding.RULES),
and a per-device kernel run over the mesh."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from yarn_jax import sharding


def specs(split: bool) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """(queries [B, T, N, H], keys / values [B, S, K, H], ids [B, T]) specs: batch and heads as the model
    shards them; the sequence over sharding.SEQ_AXIS when `split`, else whole."""
    seq = "seq" if split else None
    return (sharding.spec(("batch", seq, "heads", "head_dim")), sharding.spec(("batch", seq, "kv_heads", "head_dim")),
            sharding.spec(("batch", seq)))


def per_device(kernel: Callable[..., jax.Array], mesh: Mesh) -> Callable[..., jax.Array]:
    """`kernel` (the attention signature of yarn_jax.attention) run inside shard_map: batch and heads split
    as the model's activations, the sequence whole. Segment ids None stay None (one document per row)."""
    q_spec, kv_spec, ids = specs(False)

    def attend(q, k, v, q_seg, kv_seg, q_idx, kv_idx, *, window=None):
        if q_seg is None:
            fn = lambda q, k, v, qi, ki: kernel(q, k, v, None, None, qi, ki, window=window)  # noqa: E731
            return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids, ids), out_specs=q_spec,
                                 check_vma=False)(q, k, v, q_idx, kv_idx)
        fn = functools.partial(kernel, window=window)
        return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids, ids, ids, ids),
                             out_specs=q_spec, check_vma=False)(q, k, v, q_seg, kv_seg, q_idx, kv_idx)

    return attend
