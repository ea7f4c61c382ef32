"""The block-kernel interface that ring attention computes every (query block, key block) pair through.

    forward(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], mask) -> (out [B, T, N, H] q.dtype, lse [B, N, T] f32)
    backward(q, k, v, out, lse, d_out, mask) -> (dq, dk, dv) float32 or the inputs' dtype

`lse` is the log-sum-exp of the scaled logits (q k^T / sqrt(H), natural log) over the block's visible keys.
`backward` is called with the *global* output and lse (the whole ring's, for these queries), so the
probabilities it recomputes, exp(logits - lse), are the final ones and its rowsum(dO * O) is the global
one: the per-block gradients then simply add up. Nothing differentiates through `forward`'s lse.

A `Mask` says which pairs of a block see each other. Fused kernels (cuDNN, splash) take the positional
ones: all pairs, or causal (query row r sees key column c <= r, top-left aligned, square blocks). Explicit
token indices (the striped ring layout, where a block's causal pattern is not positional; a sliding
window, which depends on where the block lies in the sequence) and segment ids are for the kernels that
say they take them (`supports`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
from jax.typing import DTypeLike


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Visibility within one block. causal: query i sees key j iff index_q[i] >= index_kv[j], where the
    indices are `q_index` / `kv_index` [B, T] / [B, S] when given, else 0..T-1 / 0..S-1 (positional).
    Segment ids [B, T] / [B, S] (None: one document) further restrict to the same document, and `window`
    (None: none) to keys less than `window` indices back (the sliding window: a query and the window - 1
    keys before it)."""

    causal: bool = dataclasses.field(metadata={"static": True})
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    q_index: jax.Array | None = None
    kv_index: jax.Array | None = None
    window: int | None = dataclasses.field(default=None, metadata={"static": True})


class UnsupportedJaxError(NotImplementedError, ValueError):
    """A kernel written against private jax entry points, on a jax version it was not written for: the
    user's environment, so a ValueError too (one line from the command lines, no traceback)."""


class BlockKernel(Protocol):
    name: str

    def supports(self, mask: Mask, block: int, dtype: DTypeLike) -> str | None:
        """None when the kernel computes `mask` over blocks of `block` tokens (the shortest query or key
        block the ring hands it) with q, k, v in `dtype`, else why not (one short phrase)."""

    def forward(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> tuple[jax.Array, jax.Array]: ...

    def backward(self, q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array,
                 mask: Mask) -> tuple[jax.Array, jax.Array, jax.Array]: ...
