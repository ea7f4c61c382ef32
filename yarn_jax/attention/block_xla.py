"""The portable block kernel: a blockwise XLA loop, flash-attention style (any platform, any `Mask`).

Chunks of `Q_CHUNK` queries meet chunks of `KV_CHUNK` keys one pair at a time (scores [B, K, G, 1024, 512]
float32 at most), merged by online softmax; pairs with no visible key are skipped with `lax.cond`.
A flash kernel's arithmetic: matmul operands in the compute dtype (p and dS rounded to it), float32
accumulation, softmax and accumulators in float32. GQA by grouping the N query heads as [K, G], never
repeating K/V. It is the ring's kernel on CPU, for the striped layout and wherever a fused kernel does not
take the mask (also on one device: `attention`), and the reference the fused block kernels are tested
against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from yarn_jax.attention import reference
from yarn_jax.attention.block import Mask
from yarn_jax.model.execution import divisor_at_most

Q_CHUNK, KV_CHUNK = 1024, 512


def _split(x: jax.Array, c: int, axis: int = 1) -> jax.Array:
    """Chunks of `c` along `axis` to a new leading axis: [B, S, ...] -> [S / c, B, c, ...] (axis 1)."""
    x = x.reshape(*x.shape[:axis], x.shape[axis] // c, c, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unsplit(x: jax.Array, axis: int = 1) -> jax.Array:
    """Inverse of `_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


def _ids(mask: Mask, b: int, t: int, s: int):
    """(q_seg, kv_seg, q_idx, kv_idx) as arrays [B, T] / [B, S]: defaults fill what the mask leaves out."""
    q_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if mask.q_index is None else mask.q_index
    kv_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)) if mask.kv_index is None else mask.kv_index
    q_seg = jnp.zeros((b, t), jnp.int32) if mask.q_segment_ids is None else mask.q_segment_ids
    kv_seg = jnp.zeros((b, s), jnp.int32) if mask.kv_segment_ids is None else mask.kv_segment_ids
    return q_seg, kv_seg, q_idx, kv_idx


def forward(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> tuple[jax.Array, jax.Array]:
    """(out [B, T, N, H] q.dtype, lse [B, N, T] float32); see the module docstring."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    q_seg, kv_seg, q_idx, kv_idx = _ids(mask, b, t, s)
    cq, ck = divisor_at_most(t, Q_CHUNK), divisor_at_most(s, KV_CHUNK)
    kv = tuple(_split(x, ck) for x in (k, v, kv_seg, kv_idx))

    def q_chunk(_, xs):
        qc, seg_q, idx_q = xs
        acc = jnp.zeros((b, cq, kh, g, h), jnp.float32)
        m = jnp.full((b, kh, g, cq), reference.MASK_VALUE, jnp.float32)
        l_ = jnp.zeros((b, kh, g, cq), jnp.float32)

        def kv_chunk(carry, ys):
            kc, vc, seg, idx = ys
            allowed = _allowed(mask, seg_q, seg, idx_q, idx)
            merged = lambda: _merge(*carry, *_stats(qc, kc, vc, allowed))  # noqa: E731
            if not _skippable(mask):
                return merged(), None
            return jax.lax.cond(jnp.any(allowed), merged, lambda: carry), None

        acc, m, l_ = jax.lax.scan(kv_chunk, (acc, m, l_), kv)[0]
        l_ = jnp.maximum(l_, jnp.finfo(jnp.float32).tiny)  # rows with no visible key: out 0, lse junk
        out = acc / jnp.transpose(l_, (0, 3, 1, 2))[..., None]  # [B, cq, K, G, H]
        return None, (out.reshape(b, cq, n, h).astype(q.dtype), (m + jnp.log(l_)).reshape(b, n, cq))

    _, (out, lse) = jax.lax.scan(q_chunk, None, tuple(_split(x, cq) for x in (q, q_seg, q_idx)))
    return _unsplit(out), _unsplit(lse, 2)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array,
             mask: Mask) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) float32 of one block, from the global `out` and `lse` (module docstring of block.py)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    q_seg, kv_seg, q_idx, kv_idx = _ids(mask, b, t, s)
    cq, ck = divisor_at_most(t, Q_CHUNK), divisor_at_most(s, KV_CHUNK)
    grouped = lambda x: x.reshape(b, x.shape[1], kh, g, h)  # noqa: E731  [B, T, K, G, H]
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731  float32 gradient accumulators
    qg, do = grouped(q), grouped(d_out.astype(q.dtype))
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", do.astype(jnp.float32), grouped(out).astype(jnp.float32))  # rowsum(dO*O)
    lse = lse.reshape(b, kh, g, t)
    kv = tuple(_split(x, ck) for x in (k, v, kv_seg, kv_idx))

    def chunk_grads(qc, qgc, doc, deltac, lsec, kc, vc, allowed):  # one (query chunk, key chunk) pair
        p = jnp.exp(reference.logits(qc, kc, allowed) - lsec[..., None])  # [B, K, G, cq, ck]: the final softmax
        dv = reference.dot("BKGTS,BTKGH->BSKH", p.astype(v.dtype), doc)
        dp = reference.dot("BTKGH,BSKH->BKGTS", doc, vc)
        ds = (p * (dp - deltac[..., None]) * h**-0.5).astype(q.dtype)  # float32, then the compute dtype
        dq = reference.dot("BKGTS,BSKH->BTKGH", ds, kc)
        dk = reference.dot("BKGTS,BTKGH->BSKH", ds, qgc)
        return dq, dk, dv

    def q_chunk(dkv, xs):
        qc, qgc, doc, deltac, lsec, seg_q, idx_q = xs

        def kv_chunk(dq, ys):
            kc, vc, seg, idx = ys
            allowed = _allowed(mask, seg_q, seg, idx_q, idx)
            grads = lambda: chunk_grads(qc, qgc, doc, deltac, lsec, kc, vc, allowed)  # noqa: E731
            if _skippable(mask):
                grads_q, grads_k, grads_v = jax.lax.cond(jnp.any(allowed), grads,
                                                         lambda: (zeros(dq), zeros(kc), zeros(vc)))
            else:
                grads_q, grads_k, grads_v = grads()
            return dq + grads_q, (grads_k, grads_v)

        dq, (dk, dv) = jax.lax.scan(kv_chunk, zeros(qgc), kv)
        return (dkv[0] + _unsplit(dk), dkv[1] + _unsplit(dv)), dq

    xs = (*(_split(x, cq) for x in (q, qg, do)), _split(delta, cq, 3), _split(lse, cq, 3), _split(q_seg, cq),
          _split(q_idx, cq))
    (dk, dv), dq = jax.lax.scan(q_chunk, (zeros(k), zeros(v)), xs)
    return _unsplit(dq).reshape(q.shape), dk, dv


def _skippable(mask: Mask) -> bool:
    """Whether some chunk pairs may see nothing (worth a `lax.cond`): causal masks, packed documents and
    sliding windows."""
    return mask.causal or mask.q_segment_ids is not None or mask.window is not None


def _allowed(mask: Mask, seg_q, seg, idx_q, idx) -> jax.Array:
    """[B, cq, ck] bool of one chunk pair."""
    allowed = seg_q[:, :, None] == seg[:, None, :]
    behind = idx_q[:, :, None] - idx[:, None, :]
    if mask.causal:
        allowed &= behind >= 0
    if mask.window is not None:
        allowed &= behind < mask.window
    return allowed


def _stats(q, k, v, allowed):
    """Unnormalised chunk attention: out [B, cq, K, G, H] (sum_j p_ij v_j, p relative to the row max), row
    max m and row sum l [B, K, G, cq], float32."""
    s = reference.logits(q, k, allowed)  # [B, K, G, cq, ck]
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    out = reference.dot("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v)
    return out, m, jnp.sum(p, axis=-1)


def _merge(acc, m_acc, l_acc, out, m, l_blk):
    """Online-softmax merge of two partial results over disjoint key sets."""
    m_new = jnp.maximum(m_acc, m)
    a, b = jnp.exp(m_acc - m_new), jnp.exp(m - m_new)  # [B, K, G, cq]
    scale = lambda w: jnp.transpose(w, (0, 3, 1, 2))[..., None]  # noqa: E731  [B, cq, K, G, 1]
    return acc * scale(a) + out * scale(b), m_new, l_acc * a + l_blk * b


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """out [B, T, N, H] of one block over whole rows, differentiable through `backward` (memory linear in
    T): the single-device attention where no fused kernel takes the mask."""
    return forward(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    out, lse = forward(q, k, v, mask)
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(res, d_out):
    q, k, v, mask, out, lse = res
    dq, dk, dv = backward(q, k, v, out, lse, d_out, mask)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attention.defvjp(_attention_fwd, _attention_bwd)


class Kernel:
    """The blockwise XLA loop as a `block.BlockKernel`."""

    name = "xla"

    def supports(self, mask: Mask, block: int, dtype: DTypeLike) -> str | None:
        return None

    forward = staticmethod(forward)
    backward = staticmethod(backward)
