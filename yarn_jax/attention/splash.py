"""Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu.splash_attention).

GQA without repeating K/V: one MQA kernel per kv head (vmapped), its G query heads sharing that head's
K/V. Causal and segment ids are the kernel's own (block-sparse: fully masked blocks are skipped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from yarn_jax.attention.window import effective

TILE = 128  # splash's tiles are whole multiples of 128 tokens


def tile(n: int) -> int:
    """The largest of splash's usual tiles (512, 256, 128 tokens) that divides `n` tokens; a length that none
    divides is one tile (splash refuses it if its layout cannot take it)."""
    return next((b for b in (512, 256, 128) if n % b == 0), n)


def _kernel(t: int, s: int, heads: int, window: int | None, interpret: bool):
    block_q, block_kv = tile(t), tile(s)
    # the two-kernel backward (dkv, then dq): the fused one (the ring's blocks) writes a partial dq for every
    # key block, [S / block_kv, G, T, H], 128 times dq's memory at 64k tokens
    sizes = kernel_lib.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                                  block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                                  block_q_dq=block_q, block_kv_dq=block_kv)
    one = (mask_lib.CausalMask((t, s)) if window is None
           else mask_lib.LocalMask((t, s), window_size=(window - 1, 0), offset=0))  # causal within the window
    mask = mask_lib.MultiHeadMask([one] * heads)
    return kernel_lib.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, *, window=None, interpret=False):
    """Self-attention: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]. q_index/kv_index must be 0..T-1 (no
    ring permutation: the kernel's causal mask is positional). A sliding window shorter than the keys is the
    kernel's local mask (block-sparse: blocks wholly outside the window are skipped). `interpret`: Pallas'
    interpreter (the CPU tests).

    A length that is not a multiple of TILE (a prompt's cache, an evaluation window) is padded at the end
    to one: the causal mask keeps every real query from the padded keys, and the padded queries' rows are
    dropped (their gradients are zero)."""
    b, t, n, h = q.shape
    kh, g = k.shape[2], n // k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"attention: splash without a ring takes queries and keys of one length, got {t} and "
                         f"{k.shape[1]}")
    pad = -t % TILE
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if q_segment_ids is not None:  # a padded key's segment never matters: causality hides it
            q_segment_ids, kv_segment_ids = (jnp.pad(x, ((0, 0), (0, pad))) for x in (q_segment_ids, kv_segment_ids))
    s = t + pad
    kernel = _kernel(s, s, g, effective(window, s), interpret)
    qg = (q * h**-0.5).reshape(b, s, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, S, H], S = T + pad
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]

    def one(q1, k1, v1, q_seg, kv_seg):  # [G, S, H], [S, H], [S, H], [S], [S]
        segments = None if q_seg is None else kernel_lib.SegmentIds(q_seg, kv_seg)
        return kernel(q1, k1, v1, segment_ids=segments)

    over_heads = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(over_heads)(qg, kt, vt, q_segment_ids, kv_segment_ids)  # [B, K, G, S, H]
    return out.transpose(0, 3, 1, 2, 4)[:, :t].reshape(b, t, n, h)
