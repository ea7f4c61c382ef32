"""Perplexity as a function of context length, by the paper's protocol.

Sliding window (Press et al.; transformers' recipe, which the YaRN paper used): windows of `length` tokens
advance by `stride`; each window scores only the tokens no earlier window scored, so every token is scored
once, with up to `length` tokens of context. Documents start with BOS (never scored). `truncate` mode
scores each document cut to `length` tokens in one window, as the original YaRN eval did. A document takes
part at a length only if it has at least that many tokens (and at least `min_doc_tokens`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from yarn_jax import sharding, train_step
from yarn_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Window:
    doc: int
    begin: int  # first token of the window (absolute)
    end: int  # one past its last token
    first_scored: int  # first token (absolute) this window scores


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over an n-token document."""
    if stride < 1:
        raise ValueError(f"--sliding-window: expected a positive stride, got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        out.append((begin, end, max(prev_end, begin + 1)))  # token 0 (BOS) has nothing to be predicted from
        prev_end = end
        if end == n:
            break
    return out


def plan(docs: list[np.ndarray], length: int, stride: int | None, min_doc_tokens: int = 0) -> list[Window]:
    """The windows at one length; stride None: truncate mode (each document cut to `length`)."""
    eligible = [i for i, d in enumerate(docs) if len(d) >= max(length, min_doc_tokens)]
    if not eligible:
        longest = max((len(d) for d in docs), default=0)
        raise ValueError(f"--lengths: no document has {max(length, min_doc_tokens)} tokens (the longest has "
                         f"{longest}); drop length {length} or add longer documents")
    if stride is None:
        return [Window(i, 0, length, 1) for i in eligible]
    return [Window(i, *w) for i in eligible for w in windows(len(docs[i]), length, stride)]


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "chunk"))
def _nll(cfg: LlamaConfig, mesh: Mesh | None, chunk: int, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    return train_step.loss_fn(cfg, mesh, chunk, False, params, batch)


def evaluate(cfg: LlamaConfig, params: Any, docs: list[np.ndarray], length: int, *, stride: int | None = 256,
             min_doc_tokens: int = 0, batch_size: int = 1, mesh: Mesh | None = None, chunk: int = 2048,
             progress: Any = None) -> dict[str, float]:
    """{'perplexity', 'nll', 'tokens', 'docs'} at one context length; dynamic methods scale to `length`."""
    ws = plan(docs, length, stride, min_doc_tokens)
    total, count = 0.0, 0.0
    chunk = math.gcd(chunk, length)
    for i in range(0, len(ws), batch_size):
        group = ws[i:i + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)
        weights = np.zeros((batch_size, length), np.float32)
        for row, w in enumerate(group):
            tokens[row, :w.end - w.begin] = docs[w.doc][w.begin:w.end]
            # the prediction at window index j scores token j + 1
            weights[row, w.first_scored - w.begin - 1:w.end - w.begin - 1] = 1.0
        batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape),
                 "segment_ids": np.ones_like(tokens), "weights": weights}
        if mesh is not None:
            batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        nll, n = _nll(cfg, mesh, chunk, params, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(nll), count + float(n)
        if progress is not None:
            progress.update(len(group))
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count,
            "docs": len({w.doc for w in ws})}
