"""The reference attention: float32, explicit mask, the oracle every fast path is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative instead of -inf keeps fully masked rows finite (their output is then junk that
# the caller masks, never NaN); exp of it underflows to exactly 0 next to any unmasked logit.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def mask(q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None, q_index: jax.Array,
         kv_index: jax.Array) -> jax.Array:
    """Causal + same-document mask: [B, T] x [B, S] -> [B, T, S] bool (segment ids None: one document)."""
    causal = q_index[:, :, None] >= kv_index[:, None, :]
    if q_segment_ids is None:
        return causal
    return causal & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])


def logits_and_values(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked scaled logits [B, K, G, T, S] float32 and v [B, S, K, H] float32; GQA by grouping, no repeat."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h).astype(jnp.float32)  # [B, T, K, G, H]
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(jnp.float32), precision=hi) * h**-0.5
    s = jnp.where(allowed[:, None, None], s, MASK_VALUE)
    return s, v.astype(jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
              q_index: jax.Array, kv_index: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H) + mask) v.

    q [B, T, N, H]; k, v [B, S, K, H]; segment ids and token indices [B, T] / [B, S] (a query sees keys
    of its own segment at index <= its own). Returns [B, T, N, H] in q.dtype.
    """
    b, t, n, h = q.shape
    s, v32 = logits_and_values(q, k, v, mask(q_segment_ids, kv_segment_ids, q_index, kv_index))
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v32, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, n, h).astype(q.dtype)
