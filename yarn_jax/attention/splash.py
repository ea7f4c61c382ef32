"""Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu.splash_attention).

GQA without repeating K/V: one MQA kernel per kv head (vmapped), its G query heads sharing that head's
K/V. Causal and segment ids are the kernel's own (block-sparse: fully masked blocks are skipped).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from yarn_jax.attention.window import effective

_BLOCK = 512


def _kernel(t: int, s: int, heads: int, window: int | None):
    block_q, block_kv = min(_BLOCK, t), min(_BLOCK, s)
    sizes = kernel_lib.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                  block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                                  block_q_dq=block_q, block_kv_dq=block_kv)
    one = (mask_lib.CausalMask((t, s)) if window is None
           else mask_lib.LocalMask((t, s), window_size=(window - 1, 0), offset=0))  # causal within the window
    mask = mask_lib.MultiHeadMask([one] * heads)
    return kernel_lib.make_splash_mqa_single_device(mask, block_sizes=sizes)


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, *, window=None):
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N, H]. q_index/kv_index must be 0..T-1 (no ring
    permutation: the kernel's causal mask is positional). A sliding window shorter than the keys is the
    kernel's local mask (block-sparse: blocks wholly outside the window are skipped)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    kernel = _kernel(t, s, g, effective(window, s))
    qg = (q * h**-0.5).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]

    def one(q1, k1, v1, q_seg, kv_seg):  # [G, T, H], [S, H], [S, H], [T], [S]
        segments = None if q_seg is None else kernel_lib.SegmentIds(q_seg, kv_seg)
        return kernel(q1, k1, v1, segment_ids=segments)

    over_heads = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(over_heads)(qg, kt, vt, q_segment_ids, kv_segment_ids)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
