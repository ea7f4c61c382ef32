"""Perplexity as a function of context length: the YaRN paper's protocol, or transformers'.

Both slide windows (Press et al.) advancing by `stride`, each scoring only the tokens no earlier window
scored, so every token is scored once. They differ in where BOS goes and how windows are averaged:
  - `Protocol.YARN` (the default; the authors' `eval/perplexity.py`, jquesnelle/yarn): every window is BOS +
    up to length - 1 tokens of text; the result is exp of the mean over all windows (of every document) of
    each window's mean NLL. Every document with at least `min_doc_tokens` tokens takes part, at every length.
  - `Protocol.HF` (transformers' perplexity guide): the document starts with BOS once, windows hold up to
    `length` of its tokens; the result is exp(total NLL / scored tokens); a document takes part at a
    length only if it has that many tokens (and `min_doc_tokens`).
`truncate` (stride None) scores each document cut to `length` tokens (BOS + length - 1 of text) in one
window; there the two protocols agree. A tokenizer without BOS (Qwen's): documents start with their first
text token, which nothing predicts, and the YARN protocol's windows hold up to `length` tokens of text.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from yarn_jax import sharding
from yarn_jax.model import loss
from yarn_jax.model.config import LlamaConfig
from yarn_jax.model.execution import divisor_at_most


class Protocol(enum.Enum):
    YARN = "yarn"
    HF = "hf"


@dataclasses.dataclass(frozen=True)
class Window:
    doc: int
    begin: int  # first token of the window (absolute, in the document with its BOS at 0)
    end: int  # one past its last token
    first_scored: int  # first token (absolute) this window scores
    bos: bool = False  # BOS is prepended to the window (the YaRN protocol)


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


def yarn_windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each window over an n-token document whose token 0 is BOS: windows
    of up to length - 1 text tokens (BOS goes in front of each), as the authors' loop slides them."""
    if stride < 1:
        raise ValueError(f"--sliding-window: expected a positive stride, got {stride}")
    out, prev_end, text = [], 0, n - 1
    for begin in range(0, text, stride):
        end = min(begin + length - 1, text)
        out.append((begin + 1, end + 1, max(prev_end, begin) + 1))  # in document coordinates (BOS at 0)
        prev_end = end
        if end == text:
            break
    return out


def plan(docs: list[np.ndarray], length: int, stride: int | None, min_doc_tokens: int = 0,
         protocol: Protocol = Protocol.YARN, bos: bool = True) -> list[Window]:
    """The windows at one length; stride None: truncate mode (each document cut to `length`). Some document
    must have `length` tokens (else the length measures nothing); the YARN protocol then scores every
    document with at least `min_doc_tokens`, the HF protocol those with at least `length` too."""
    eligible = [i for i, d in enumerate(docs) if len(d) >= max(length, min_doc_tokens)]
    if not eligible:
        longest = max((len(d) for d in docs), default=0)
        if min_doc_tokens > length:
            raise ValueError(f"--min-doc-tokens: no document has {min_doc_tokens} tokens (the longest has "
                             f"{longest}); lower it or add longer documents")
        raise ValueError(f"--lengths: no document has {length} tokens (the longest has {longest}); drop length "
                         f"{length} or add longer documents")
    span = length - 1 if protocol is Protocol.YARN and bos else length  # document tokens a window holds
    if stride is not None and stride > span:
        raise ValueError(f"--sliding-window: a stride of {stride} tokens is longer than the windows at length "
                         f"{length} ({span} tokens of text): the tokens between windows would never be scored; "
                         f"use a stride of at most {span}")
    if protocol is Protocol.YARN and stride is not None:
        every = [i for i, d in enumerate(docs) if len(d) >= max(2, min_doc_tokens)]
        if not bos:  # no BOS to put in front: plain slides over the text
            return [Window(i, *w) for i in every for w in windows(len(docs[i]), length, stride)]
        return [Window(i, *w, bos=True) for i in every for w in yarn_windows(len(docs[i]), length, stride)]
    if stride is None:
        return [Window(i, 0, length, 1) for i in eligible]
    return [Window(i, *w) for i in eligible for w in windows(len(docs[i]), length, stride)]


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "chunk"))
def _nll(cfg: LlamaConfig, mesh: Mesh | None, chunk: int, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    return loss.loss_fn(cfg, mesh, chunk, False, params, batch)


def evaluate(cfg: LlamaConfig, params: Any, docs: list[np.ndarray], length: int, *, stride: int | None = 256,
             min_doc_tokens: int = 0, batch_size: int = 1, mesh: Mesh | None = None, chunk: int = 2048,
             progress: Any = None, protocol: Protocol = Protocol.YARN, bos: bool = True) -> dict[str, float]:
    """{'perplexity', 'nll', 'tokens', 'docs'} at one context length (docs: token ids, BOS first unless
    `bos` is false: the tokenizer has none); dynamic methods scale to `length`. See the module docstring
    for the protocols."""
    ws = plan(docs, length, stride, min_doc_tokens, protocol, bos)
    total, count, scored = 0.0, 0.0, 0
    chunk = divisor_at_most(length, chunk)
    by_window = protocol is Protocol.YARN
    for i in range(0, len(ws), batch_size):
        group = ws[i:i + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)
        weights = np.zeros((batch_size, length), np.float32)
        for row, w in enumerate(group):
            head = [docs[w.doc][0]] if w.bos else []
            offset = len(head) - w.begin  # window index of document token p: p + offset
            tokens[row, :len(head) + w.end - w.begin] = [*head, *docs[w.doc][w.begin:w.end]]
            # the prediction at window index j scores token j + 1; a window's mean NLL: weights 1 / its count
            n = w.end - w.first_scored
            weights[row, w.first_scored + offset - 1:w.end + offset - 1] = 1.0 / n if by_window else 1.0
            scored += n
        batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape),
                 "segment_ids": np.ones_like(tokens), "weights": weights}
        if mesh is not None:
            batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        nll, n = _nll(cfg, mesh, chunk, params, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(nll), count + float(n)
        if progress is not None:
            progress.update(len(group))
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": scored,
            "docs": len({w.doc for w in ws})}
