"""Attention backends behind one signature:

    fn(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], q_segment_ids [B, T] | None,
       kv_segment_ids [B, S] | None, q_index [B, T], kv_index [B, S]) -> [B, T, N, H]

`q_index` / `kv_index` are token indices in the full sequence (causality), not RoPE positions: packed
documents restart their positions but not their order, and ring attention permutes the sequence.
Segment ids None means one document per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from yarn_jax.attention import block_xla, cudnn, decode, reference, ring
from yarn_jax.attention.block import BlockKernel
from yarn_jax.attention.sharded import per_device
from yarn_jax.model.execution import AttentionImpl, Execution
from yarn_jax.sharding import ring_size

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
    auto = impl is AttentionImpl.AUTO
    impl = _resolve(impl, platform)
    if impl is AttentionImpl.CUDNN:
        return _cudnn_or_reference if auto else cudnn.attention
    if impl is AttentionImpl.SPLASH:
        from yarn_jax.attention import splash  # needs jax's Pallas TPU ops

        return splash.attention
    return reference.attention


def _cudnn_or_reference(q: jax.Array, *args, **kwargs) -> jax.Array:
    """AUTO on GPU: cuDNN for the dtypes its fused kernel takes (float16, bfloat16), the reference for
    float32 (an evaluation in full precision)."""
    return (cudnn.attention if cudnn.takes(q.dtype) else reference.attention)(q, *args, **kwargs)


def packed_documents_limit(execution: Execution, mesh: Mesh | None, window: int | None) -> int | None:
    """The documents a row past which this mesh's per-device GPU kernel runs a packed batch through the XLA
    block kernel (`cudnn.packed_limit`; 0 with a sliding `window` shorter than the rows, which the packed
    layout does not take), for the trainer's host-side count; None where no per-device cuDNN kernel runs
    (other platforms, float32 steps, and a ring, whose fallback warns as it is traced)."""
    platform = None if mesh is None else mesh.devices.flat[0].platform
    if (ring_size(mesh) > 1 or _resolve(execution.attention, platform) is not AttentionImpl.CUDNN
            or not cudnn.takes(execution.dtype)):
        return None
    return 0 if window is not None else cudnn.packed_limit()


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
    """Attention of a few new tokens to the whole KV cache, their keys and values written into it
    (`decode.attention`'s signature): flash-decoding over a cache in token order (one device, or a mesh
    that does not split the cache), or, with the cache split over the mesh's 'seq' axis in the ring's
    order, per shard merged by lse."""
    if ring_size(mesh) > 1:
        return decode.writing(ring.decode_attention(mesh), whole=False)
    if mesh is None:
        return decode.attention(jax.default_backend())
    return decode.writing(decode.per_device(decode.reading(mesh.devices.flat[0].platform), mesh), whole=False)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The order of a sequence's T tokens along the mesh: 0..T-1 on one device; the ring's permutation when
    the mesh splits the sequence (each device then holds its contiguous block of the permuted sequence)."""

    perm: np.ndarray | None  # [T] the token at each place; None: the identity

    def apply(self, x: Any) -> Any:
        """[B, T, ...] in token order -> in layout order (None stays None)."""
        return x if self.perm is None or x is None else x[:, self.perm]

    def restore(self, x: Any) -> Any:
        """[B, T, ...] in layout order -> in token order."""
        return x if self.perm is None else x[:, np.argsort(self.perm)]

    def index(self, batch: int, seq_len: int) -> jax.Array:
        """[B, T] int32: the token index at each place (what attention's causality compares)."""
        order = np.arange(seq_len) if self.perm is None else self.perm
        return jnp.broadcast_to(jnp.asarray(order, jnp.int32), (batch, seq_len))


def layout(execution: Execution, mesh: Mesh | None, seq_len: int) -> Layout:
    """The sequence layout of `mesh` for `seq_len` tokens (checks that they divide over the ring)."""
    if ring_size(mesh) == 1:
        return Layout(None)
    return Layout(ring.permutation(seq_len, ring_size(mesh), execution.ring_layout))


def for_mesh(execution: Execution, mesh: Mesh | None, seq_len: int) -> tuple[AttentionFn, Layout]:
    """(attend, layout), decided once per mesh: ring attention over 'seq' with the ring's layout when the
    mesh splits the sequence, else the per-device kernel and the identity; kernels for the mesh's platform
    (which may differ from the host's when compiling ahead of time for a TPU topology). Callers put their
    [B, T] inputs in `layout` order, pass `layout.index` as the token index, and restore per-token outputs."""
    order, impl = layout(execution, mesh, seq_len), execution.attention
    if mesh is None:
        return select(impl), order
    platform = mesh.devices.flat[0].platform
    if ring_size(mesh) > 1:
        return ring.ring_attention(mesh, block_kernel(impl, platform), execution.ring_layout), order
    return per_device(select(impl, platform), mesh), order
