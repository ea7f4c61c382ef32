"""The next-token loss of a batch, shared by the train step and perplexity evaluation.

The loss never materialises [B, T, V] float32 logits: the final hidden states are cut into chunks of
`loss_chunk` tokens whose logits are computed and reduced one chunk at a time; under differentiation
each chunk's gradient is taken right there (`_nll`), so nothing of the logits is kept or recomputed.
With the mesh's seq axis > 1 the batch is permuted to the ring's layout first; every per-token term
follows the permutation, so the loss is unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from yarn_jax import attention
from yarn_jax.model.config import LlamaConfig
from yarn_jax.model.llama import hidden_states, unembedding


def targets(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token targets [B, T] and weights [B, T]: the last position, positions whose next token
    starts another segment and padding (segment 0) have no target."""
    nxt = jnp.roll(tokens, -1, axis=1)
    same = (segment_ids == jnp.roll(segment_ids, -1, axis=1)) & (segment_ids > 0)
    last = jnp.arange(tokens.shape[1]) == tokens.shape[1] - 1
    return nxt, (same & ~last[None]).astype(jnp.float32)


def chunked_nll(cfg: LlamaConfig, params: Any, hidden: jax.Array, tgt: jax.Array, weights: jax.Array,
                chunk: int) -> jax.Array:
    """Sum of weighted negative log-likelihoods of hidden [B, T, D] (final-norm states) against tgt [B, T]
    with weights [B, T]; logits [B, chunk, V] float32 exist one chunk at a time (`_nll`)."""
    t = hidden.shape[1]
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"train.loss_chunk: expected a divisor of seq_len ({t}), got {chunk}")
    return _nll(hidden, unembedding(cfg, params), tgt, weights, chunk)


def _split(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...]: chunk i holds positions i, i + n, i + 2n, ... (n chunks),
    so each chunk spans every 'seq' shard and no device waits for another's chunk (a sum ignores order)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, chunk, t // chunk, *x.shape[2:]), 2, 0)


def _unsplit(x: jax.Array) -> jax.Array:
    """The inverse of `_split`: [n, B, chunk, ...] -> [B, chunk * n, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, c * n, *x.shape[3:])


def _chunks(hidden, tgt, weights, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The scan's inputs: hidden [n, B, c, D], tgt and weights [n, B, c] (`_split`)."""
    return _split(hidden, chunk), _split(tgt, chunk), _split(weights, chunk)


def _chunk_terms(h, w, y, wt):
    """One chunk: h [B, c, D], w [D, V] (both in the compute dtype), y, wt [B, c] -> (weighted NLL sum,
    logits [B, c, V] float32, their log-sum-exp [B, c])."""
    logits = jnp.einsum("BCD,DV->BCV", h, w, preferred_element_type=jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * wt), logits, logz


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll(hidden: jax.Array, w: jax.Array, tgt: jax.Array, weights: jax.Array, chunk: int) -> jax.Array:
    """hidden [B, T, D] (compute dtype), w [D, V] (the unembedding in its parameter dtype) -> the weighted
    NLL sum, chunk by chunk. Differentiated, the forward pass also takes each chunk's gradient (softmax
    minus the one-hot target, times the weight, as the logits' cotangent in the compute dtype; dh [B, c, D]
    kept, dW summed in float32), so the backward pass only scales them: three GEMMs per chunk, not the four
    of recomputing the logits under a checkpoint, and no float32 logits kept or made again."""
    w = w.astype(hidden.dtype)

    def body(total, xs):
        h, y, wt = xs  # [B, c, D], [B, c], [B, c]
        return total + _chunk_terms(h, w, y, wt)[0], None

    total, _ = jax.lax.scan(body, jnp.float32(0), _chunks(hidden, tgt, weights, chunk))
    return total


def _nll_fwd(hidden, w, tgt, weights, chunk):
    wc = w.astype(hidden.dtype)

    def body(carry, xs):
        total, dw = carry
        h, y, wt = xs  # [B, c, D], [B, c], [B, c]
        nll, logits, logz = _chunk_terms(h, wc, y, wt)
        probs = jnp.exp(logits - logz[..., None])
        g = ((probs - jax.nn.one_hot(y, logits.shape[-1], dtype=probs.dtype)) * wt[..., None]).astype(h.dtype)
        dh = jnp.einsum("BCV,DV->BCD", g, wc)
        dw = dw + jnp.einsum("BCD,BCV->DV", h, g, preferred_element_type=jnp.float32)
        return (total + nll, dw), dh

    init = (jnp.float32(0), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, _chunks(hidden, tgt, weights, chunk))
    return total, (_unsplit(dh), dw, jnp.zeros((0,), w.dtype))


def _nll_bwd(chunk, res, g):
    dh, dw, w_dtype = res  # w_dtype: an empty array of w's dtype (residuals are arrays)
    return (g * dh).astype(dh.dtype), (g * dw).astype(w_dtype.dtype), None, None


_nll.defvjp(_nll_fwd, _nll_bwd)


def loss_fn(cfg: LlamaConfig, mesh: Mesh | None, loss_chunk: int, segment_mask: bool, params: Any,
            batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL, number of target tokens) for one micro-batch. segment_mask: attention stays inside
    each segment (packed documents); otherwise whole chunks attend causally (the paper's chunks).
    batch["weights"] [B, T] (optional) further weights the prediction made at each position (evaluation
    scores only the tokens a sliding window has not scored yet)."""
    tokens, positions, segment_ids = batch["tokens"], batch["positions"], batch["segment_ids"]
    tgt, w = targets(tokens, segment_ids)
    if "weights" in batch:
        w = w * batch["weights"]
    b, t = tokens.shape
    attend, layout = attention.for_mesh(cfg.execution, mesh, t)
    tokens, positions, segment_ids, tgt, w = (layout.apply(x) for x in (tokens, positions, segment_ids, tgt, w))
    hidden = hidden_states(cfg, params, tokens, positions, segment_ids if segment_mask else None,
                           layout.index(b, t), attend=attend, mesh=mesh)
    return chunked_nll(cfg, params, hidden, tgt, w, loss_chunk), jnp.sum(w)
