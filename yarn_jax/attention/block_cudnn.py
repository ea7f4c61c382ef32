"""cuDNN flash attention as a ring block kernel (NVIDIA GPUs, Hopper and later for the ring's shapes).

Written for jax 0.10 and 0.11, whose `jax._src.cudnn.fused_attention_stablehlo` (private) provides
  - `dot_product_attention(..., return_residual=True)`: the forward with its float32 softmax statistics,
    the log-sum-exp of the scaled logits, [B, N, T];
  - `_dot_product_attention_bwd_p_wrapper`: the backward primitive, which takes the forward's output and
    statistics as inputs; the ring gives it the global ones.
Other jax versions are refused with a clear message (`cudnn.fused`: jax 0.12 changed these signatures). Positional masks
only (all pairs, or causal on a square block); packed documents (segment ids), explicit token indices
(striped layout) and sliding windows are not taken, so the ring falls back to the XLA block kernel for them.
"""

from __future__ import annotations

import jax
from jax.typing import DTypeLike

from yarn_jax.attention import cudnn
from yarn_jax.attention.block import Mask


def _mask_type(fused, mask: Mask):
    return fused.MaskType.CAUSAL if mask.causal else fused.MaskType.NO_MASK


def forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> tuple[jax.Array, jax.Array]:
    """(out [B, T, N, H] q.dtype, lse [B, N, T] float32); GQA natively (K heads are not repeated)."""
    fused = cudnn.fused()
    out, lse = fused.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask_type=_mask_type(fused, mask),
                                           qkv_layout="BTNH", return_residual=True)
    return out, lse


def backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array,
             mask: Mask) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) in q's dtype, from the global `out` and `lse`."""
    fused = cudnn.fused()
    unused = jax.numpy.zeros(0, q.dtype)  # bias, sequence lengths, offsets, page tables: none
    dq, dk, dv = fused._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, unused, unused, unused, unused, unused, unused, lse, out.astype(q.dtype),
        d_out.astype(q.dtype), scale=q.shape[-1] ** -0.5, seed=42, dropout_rate=0.0, variadic_args=(False, False),
        mask_type=_mask_type(fused, mask), layout=fused.AttentionLayout.BTNH.value, sliding_window_length=None)
    return dq, dk, dv


class Kernel:
    """cuDNN as a `block.BlockKernel`."""

    name = "cudnn"

    def supports(self, mask: Mask, block: int, dtype: DTypeLike) -> str | None:
        if not cudnn.takes(dtype):  # an evaluation in full precision
            return f"cuDNN blocks take float16 or bfloat16 only (this is {jax.numpy.dtype(dtype).name})"
        if mask.q_segment_ids is not None:
            return "cuDNN blocks take no segment ids (packed documents)"
        if mask.window is not None:
            return "cuDNN blocks take no sliding window (it depends on where a block lies)"
        if mask.q_index is not None:
            return "cuDNN blocks take positional masks only (not the striped layout)"
        return None

    forward = staticmethod(forward)
    backward = staticmethod(backward)
