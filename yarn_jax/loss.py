"""The next-token loss of a batch, shared by the train step and perplexity evaluation.

The loss never materialises [B, T, V] float32 logits: the final hidden states are cut into chunks of
`loss_chunk` tokens whose logits are computed, reduced and recomputed in the backward pass
(jax.checkpoint). With the mesh's seq axis > 1 the batch is permuted to the ring's layout first; every
per-token term follows the permutation, so the loss is unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from yarn_jax import attention
from yarn_jax.config import LlamaConfig
from yarn_jax.llama import hidden_states, unembed


def targets(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token targets [B, T] and weights [B, T]: the last position, positions whose next token
    starts another segment and padding (segment 0) have no target."""
    nxt = jnp.roll(tokens, -1, axis=1)
    same = (segment_ids == jnp.roll(segment_ids, -1, axis=1)) & (segment_ids > 0)
    last = jnp.arange(tokens.shape[1]) == tokens.shape[1] - 1
    return nxt, (same & ~last[None]).astype(jnp.float32)


def chunked_nll(cfg: LlamaConfig, params: Any, hidden: jax.Array, tgt: jax.Array, weights: jax.Array,
                chunk: int) -> jax.Array:
    """Sum of weighted negative log-likelihoods; logits [B, chunk, V] float32 exist one chunk at a time."""
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"train.loss_chunk: expected a divisor of seq_len ({t}), got {chunk}")
    n = t // chunk
    # chunk i holds positions i, i + n, i + 2n, ...: each chunk spans every 'seq' shard, so the scan runs
    # over an unsharded axis and no device waits for another's chunk (the sum does not care about order)
    split = lambda x: jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)  # noqa: E731

    @jax.checkpoint
    def one(h, y, w):  # [B, c, D], [B, c], [B, c]
        logits = unembed(cfg, params, h)  # [B, c, V] float32
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * w)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0), (split(hidden), split(tgt), split(weights)))
    return total


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
