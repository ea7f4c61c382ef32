"""The reference attention (float32, explicit mask): the oracle every fast path is tested against. Its
masked logits and float32-accumulating matmuls also serve ring attention's blockwise kernel, which feeds
them compute-dtype operands."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative instead of -inf keeps fully masked rows finite (their output is then junk that
# the caller masks, never NaN); exp of it underflows to exactly 0 next to any unmasked logit.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def mask(q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, q_index: jax.Array,
         kv_index: jax.Array, window: int | None = None) -> jax.Array:
    """Causal + same-document mask: [B, T] x [B, S] -> [B, T, S] bool (segment ids None: one document).
    window: a query sees only keys less than `window` tokens back (transformers' sliding window: itself
    and the window - 1 before it); None: every earlier key."""
    behind = q_index[:, :, None] - kv_index[:, None, :]  # [B, T, S]
    causal = behind >= 0
    if window is not None:
        causal &= behind < window
    if q_segment_ids is None:
        return causal
    return causal & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])


def dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with float32 accumulation of operands in their own dtype: bfloat16 products are exact in
    float32 (the flash-attention kernels' arithmetic); float32 operands keep full float32 precision."""
    hi = jax.lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else jax.lax.Precision.DEFAULT
    return jnp.einsum(spec, a, b, precision=hi, preferred_element_type=jnp.float32)


def logits(q: jax.Array, k: jax.Array, allowed: jax.Array) -> jax.Array:
    """Masked scaled logits [B, K, G, T, S] float32 of q [B, T, N, H] and k [B, S, K, H] (GQA by grouping,
    no repeat), accumulated in float32 from the operands' dtype."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    s = dot("BTKGH,BSKH->BKGTS", q.reshape(b, t, kv_heads, n // kv_heads, h), k) * h**-0.5
    return jnp.where(allowed[:, None, None], s, MASK_VALUE)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
              q_index: jax.Array, kv_index: jax.Array, *, window: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) v, all in float32.

    q [B, T, N, H]; k, v [B, S, K, H]; segment ids and token indices [B, T] / [B, S] (a query sees keys
    of its own segment at index <= its own, and within `window` tokens when given). Returns [B, T, N, H]
    in q.dtype.
    """
    b, t, n, h = q.shape
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    allowed = mask(q_segment_ids, kv_segment_ids, q_index, kv_index, window)
    p = jax.nn.softmax(logits(q32, k32, allowed), axis=-1)
    return dot("BKGTS,BSKH->BTKGH", p, v32).reshape(b, t, n, h).astype(q.dtype)
