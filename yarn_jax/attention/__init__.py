"""Attention backends behind one signature:

    fn(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], q_segment_ids [B, T] | None,
       kv_segment_ids [B, S] | None, q_index [B, T], kv_index [B, S]) -> [B, T, N, H]

`q_index` / `kv_index` are token indices in the full sequence (causality), not RoPE positions: packed
documents restart their positions but not their order, and ring attention permutes the sequence.
Segment ids None means one document per row.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from yarn_jax.attention import cudnn, reference
from yarn_jax.config import AttentionImpl, LlamaConfig

AttentionFn = Callable[..., jax.Array]
_PLATFORMS = {AttentionImpl.REFERENCE: None, AttentionImpl.CUDNN: "gpu", AttentionImpl.SPLASH: "tpu"}


def select(impl: AttentionImpl, platform: str | None = None) -> AttentionFn:
    """The per-device kernel for `impl` on `platform` (default: JAX's default backend).

    AUTO: cuDNN on GPU, splash on TPU, reference elsewhere. Asking for a kernel the platform lacks is an error, never a
    silent fallback.
    """
    platform = platform or jax.default_backend()
    if impl is AttentionImpl.AUTO:
        impl = {"gpu": AttentionImpl.CUDNN, "tpu": AttentionImpl.SPLASH}.get(platform, AttentionImpl.REFERENCE)
    needed = _PLATFORMS[impl]
    if needed is not None and needed != platform:
        raise ValueError(f"attention: {impl.value!r} needs platform {needed!r}, but this is {platform!r}; "
                         "use 'reference' or 'auto'")
    if impl is AttentionImpl.CUDNN:
        return cudnn.attention
    if impl is AttentionImpl.SPLASH:
        from yarn_jax.attention import splash  # needs jax's Pallas TPU ops

        return splash.attention
    return reference.attention


BATCH_AXES, HEAD_AXIS = ("data", "fsdp"), "tensor"


def per_device(kernel: AttentionFn, mesh: Mesh, seq_axis: str | None = None) -> AttentionFn:
    """`kernel` run inside shard_map: batch split over data x fsdp, heads over tensor, the sequence over
    `seq_axis` (None: whole). Segment ids None stay None (one document per row)."""
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


def for_mesh(cfg: LlamaConfig, mesh: Mesh | None) -> AttentionFn:
    """Ring attention over 'seq' when the mesh splits the sequence, else the per-device kernel of the
    mesh's platform (which may differ from the host's when compiling ahead of time for a TPU topology)."""
    if mesh is None:
        return select(cfg.attention)
    if mesh.shape["seq"] > 1:
        from yarn_jax import ring

        return ring.ring_attention(mesh)
    return per_device(select(cfg.attention, mesh.devices.flat[0].platform), mesh)
