"""Attention backends behind one signature:

    fn(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], q_segment_ids [B, T], kv_segment_ids [B, S],
       q_index [B, T], kv_index [B, S]) -> [B, T, N, H]

`q_index` / `kv_index` are token indices in the full sequence (causality), not RoPE positions: packed
documents restart their positions but not their order, and ring attention permutes the sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from yarn_jax.attention import reference
from yarn_jax.config import AttentionImpl

AttentionFn = Callable[..., jax.Array]


def select(impl: AttentionImpl, platform: str | None = None) -> AttentionFn:
    """The kernel for `impl` on `platform` (default: the default backend); a wrong pairing is an error."""
    platform = platform or jax.default_backend()
    if impl is AttentionImpl.AUTO:
        impl = AttentionImpl.REFERENCE
    if impl is AttentionImpl.REFERENCE:
        return reference.attention
    raise ValueError(f"attention: {impl.value!r} is not available on platform {platform!r}; "
                     f"use 'reference' or 'auto'")
