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
from jax.sharding import Mesh

from yarn_jax.attention import block_xla, cudnn, reference, ring
from yarn_jax.attention.block import BlockKernel
from yarn_jax.attention.sharded import per_device
from yarn_jax.config import AttentionImpl, LlamaConfig

AttentionFn = Callable[..., jax.Array]
_PLATFORMS = {AttentionImpl.REFERENCE: None, AttentionImpl.CUDNN: "gpu", AttentionImpl.SPLASH: "tpu"}


def _resolve(impl: AttentionImpl, platform: str | None) -> AttentionImpl:
    """AUTO made concrete for `platform` (default: JAX's default backend); a kernel the platform lacks is
    an error, never a silent fallback."""
    platform = platform or jax.default_backend()
    if impl is AttentionImpl.AUTO:
        impl = {"gpu": AttentionImpl.CUDNN, "tpu": AttentionImpl.SPLASH}.get(platform, AttentionImpl.REFERENCE)
    needed = _PLATFORMS[impl]
    if needed is not None and needed != platform:
        raise ValueError(f"attention: {impl.value!r} needs platform {needed!r}, but this is {platform!r}; "
                         "use 'reference' or 'auto'")
    return impl


def select(impl: AttentionImpl, platform: str | None = None) -> AttentionFn:
    """The per-device kernel for `impl` on `platform`. AUTO: cuDNN on GPU, splash on TPU, reference elsewhere."""
    impl = _resolve(impl, platform)
    if impl is AttentionImpl.CUDNN:
        return cudnn.attention
    if impl is AttentionImpl.SPLASH:
        from yarn_jax.attention import splash  # needs jax's Pallas TPU ops

        return splash.attention
    return reference.attention


def block_kernel(impl: AttentionImpl, platform: str | None = None) -> BlockKernel:
    """The ring's block kernel for `impl` on `platform`: cuDNN's, splash's, or the XLA loop (reference)."""
    impl = _resolve(impl, platform)
    if impl is AttentionImpl.CUDNN:
        from yarn_jax.attention import block_cudnn

        return block_cudnn.Kernel()
    if impl is AttentionImpl.SPLASH:
        from yarn_jax.attention import block_splash

        return block_splash.Kernel()
    return block_xla.Kernel()


def decode_for_mesh(mesh: Mesh | None) -> AttentionFn:
    """Attention of a few new tokens to the KV cache: the reference (masks by cache slot, which fused
    kernels do not take), or, with the cache split over the mesh's 'seq' axis, per shard merged by lse."""
    if mesh is not None and mesh.shape["seq"] > 1:
        return ring.decode_attention(mesh)
    return reference.attention


def for_mesh(cfg: LlamaConfig, mesh: Mesh | None) -> AttentionFn:
    """Ring attention over 'seq' when the mesh splits the sequence, else the per-device kernel, both for
    the mesh's platform (which may differ from the host's when compiling ahead of time for a TPU topology)."""
    if mesh is None:
        return select(cfg.attention)
    platform = mesh.devices.flat[0].platform
    if mesh.shape["seq"] > 1:
        return ring.ring_attention(mesh, block_kernel(cfg.attention, platform), cfg.ring_layout)
    return per_device(select(cfg.attention, platform), mesh)
