"""Ring attention over the mesh's 'seq' axis (Liu et al. 2023), causal and load-balanced.

Each device holds one query block; key/value blocks travel around the ring with `ppermute` while the
current block is computed, and partial results merge through their log-sum-exp (online softmax); within
a block, 1024 queries meet 512 keys at a time the same way (a blockwise XLA loop, flash-attention style,
with a flash kernel's arithmetic: matmul operands in the compute dtype, float32 accumulation, softmax
and accumulators in float32).
The backward pass is a `custom_vjp` that sends K/V around the ring again together with their gradient
accumulators, so memory is O(S / ring) per device: no device ever holds the full sequence's K/V or
scores. Chunk pairs whose every (query, key) pair is masked are skipped with `lax.cond`
(`visible_fraction` says how many run).

Causal load balancing: the sequence is permuted before the model (`permutation`), so every device gets
the same amount of causal work. 'zigzag' gives device i chunks i and 2R-1-i of 2R; 'striped' gives it
tokens i, i+R, i+2R, ... Positions, segment ids and token indices follow the permutation, so RoPE sees
true global positions and the causal mask compares true token indices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from yarn_jax.attention import reference
from yarn_jax.config import RingLayout


def permutation(seq_len: int, ring: int, layout: RingLayout) -> np.ndarray:
    """perm [T]: x[:, perm] puts each device's tokens in its contiguous block of T / ring."""
    if layout is RingLayout.ZIGZAG:
        if seq_len % (2 * ring):
            raise ValueError(f"seq_len: expected a multiple of 2 x the ring size ({2 * ring}) for the zigzag "
                             f"layout, got {seq_len}")
        chunks = np.arange(seq_len).reshape(2 * ring, seq_len // (2 * ring))
        return np.concatenate([np.concatenate([chunks[i], chunks[2 * ring - 1 - i]]) for i in range(ring)])
    if seq_len % ring:
        raise ValueError(f"seq_len: expected a multiple of the ring size ({ring}), got {seq_len}")
    return np.arange(seq_len).reshape(seq_len // ring, ring).T.reshape(-1)


def visible_fraction(seq_len: int, ring: int, layout: RingLayout) -> float:
    """The fraction of (query chunk, key chunk) pairs that the ring computes, over every device and ring
    step, with one document per row (causal mask only; packed documents skip more): the rest are
    skipped. About half, plus the diagonal."""
    blocks = permutation(seq_len, ring, layout).reshape(ring, -1)  # [R, T]: token indices per device
    t = blocks.shape[1]
    cq, ck = _chunk(t, _Q_CHUNK), _chunk(t, _KV_CHUNK)
    q_last = blocks.reshape(ring, t // cq, cq).max(-1)  # [R, T / cq]
    k_first = blocks.reshape(ring, t // ck, ck).min(-1)  # [R, T / ck]
    return float(np.mean(q_last[:, :, None, None] >= k_first[None, None, :, :]))


# ----------------------------------------------------------------------------- one block


def _block_stats(q, k, v, allowed):
    """Unnormalised block attention: out [B, T, K, G, H] (sum_j p_ij v_j with p relative to the row max),
    row max m and row sum l [B, K, G, T], all float32. Flash-attention arithmetic: the matmuls take their
    operands in the compute dtype (p rounded to it) and accumulate in float32; the softmax is float32."""
    s = reference.logits(q, k, allowed)  # [B, K, G, T, S]
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    out = reference.dot("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v)
    return out, m, jnp.sum(p, axis=-1)


def _merge(acc, m_acc, l_acc, out, m, l_blk):
    """Online-softmax merge of two partial results over disjoint key sets."""
    m_new = jnp.maximum(m_acc, m)
    a, b = jnp.exp(m_acc - m_new), jnp.exp(m - m_new)  # [B, K, G, T]
    scale = lambda w: jnp.transpose(w, (0, 3, 1, 2))[..., None]  # noqa: E731  [B, T, K, G, 1]
    return acc * scale(a) + out * scale(b), m_new, l_acc * a + l_blk * b


_Q_CHUNK, _KV_CHUNK = 1024, 512  # one inner step: scores [B, K, G, 1024, 512] float32


def _chunk(n: int, size: int) -> int:
    return math.gcd(n, size)


def _split(x: jax.Array, c: int, axis: int = 1) -> jax.Array:
    """Chunks of `c` along `axis` to a new leading axis: [B, S, ...] -> [S / c, B, c, ...] (axis 1)."""
    x = x.reshape(*x.shape[:axis], x.shape[axis] // c, c, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unsplit(x: jax.Array, axis: int = 1) -> jax.Array:
    """Inverse of `_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2:])


def _block_forward(q, k, v, q_seg, kv_seg, q_idx, kv_idx, acc, m, l_):
    """Merges one K/V block into (acc, m, l), flash-style: chunks of `_Q_CHUNK` queries against chunks of
    `_KV_CHUNK` keys; pairs with no visible key are skipped (about half of them under a causal mask)."""
    cq, ck = _chunk(q.shape[1], _Q_CHUNK), _chunk(k.shape[1], _KV_CHUNK)
    kv = tuple(_split(x, ck) for x in (k, v, kv_seg, kv_idx))

    def q_chunk(_, xs):
        qc, seg_q, idx_q, *stats = xs

        def kv_chunk(carry, ys):
            kc, vc, seg, idx = ys
            allowed = reference.mask(seg_q, seg, idx_q, idx)
            return jax.lax.cond(jnp.any(allowed), lambda: _merge(*carry, *_block_stats(qc, kc, vc, allowed)),
                                lambda: carry), None

        return None, jax.lax.scan(kv_chunk, tuple(stats), kv)[0]

    xs = (*(_split(x, cq) for x in (q, q_seg, q_idx, acc)), _split(m, cq, 3), _split(l_, cq, 3))
    _, (acc, m, l_) = jax.lax.scan(q_chunk, None, xs)
    return _unsplit(acc), _unsplit(m, 3), _unsplit(l_, 3)


# ----------------------------------------------------------------------------- the ring


def _shift(axis: str, ring: int, *xs):
    """Send each array to the next device on the ring (device i receives from i - 1)."""
    perm = [(i, (i + 1) % ring) for i in range(ring)]
    return tuple(jax.lax.ppermute(x, axis, perm) for x in xs)


def _forward(axis, ring, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    # One barrier over all inputs: inside a scan over layers JAX would otherwise hoist out of the loop
    # whatever is computed from layer-invariant inputs alone (the ids), i.e. every chunk's mask broadcast
    # over heads at once: O(T x S x heads) memory.
    q, k, v, q_seg, kv_seg, q_idx, kv_idx = jax.lax.optimization_barrier((q, k, v, q_seg, kv_seg, q_idx, kv_idx))
    b, t, n, h = q.shape
    kh = k.shape[2]
    acc = jnp.zeros((b, t, kh, n // kh, h), jnp.float32)
    m = jnp.full((b, kh, n // kh, t), reference.MASK_VALUE, jnp.float32)
    l_ = jnp.zeros((b, kh, n // kh, t), jnp.float32)

    def step(carry, _):
        acc, m, l_, k, v, kv_seg, kv_idx = carry
        acc, m, l_ = _block_forward(q, k, v, q_seg, kv_seg, q_idx, kv_idx, acc, m, l_)
        k, v, kv_seg, kv_idx = _shift(axis, ring, k, v, kv_seg, kv_idx)
        return (acc, m, l_, k, v, kv_seg, kv_idx), None

    (acc, m, l_, *_), _ = jax.lax.scan(step, (acc, m, l_, k, v, kv_seg, kv_idx), None, length=ring)
    l_ = jnp.maximum(l_, jnp.finfo(jnp.float32).tiny)  # rows with no visible key (none in causal self-attention)
    out = acc / jnp.transpose(l_, (0, 3, 1, 2))[..., None]
    lse = m + jnp.log(l_)  # [B, K, G, T]
    return out.reshape(b, t, n, h).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(axis, ring, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    return _forward(axis, ring, q, k, v, q_seg, kv_seg, q_idx, kv_idx)[0]


def _ring_fwd(axis, ring, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    out, lse = _forward(axis, ring, q, k, v, q_seg, kv_seg, q_idx, kv_idx)
    return out, (q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse)


def _ring_bwd(axis, ring, res, d_out):
    q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse = res
    b, t, n, h = q.shape
    kh = k.shape[2]
    grouped = lambda x: x.reshape(b, t, kh, n // kh, h)  # noqa: E731  [B, T, K, G, H]
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731  float32 gradient accumulators
    qg, do = grouped(q), grouped(d_out.astype(q.dtype))
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", do.astype(jnp.float32), grouped(out).astype(jnp.float32))  # rowsum(dO*O)

    def chunk_grads(q, qg, do, delta, lse, k, v, allowed):  # one (query chunk, key chunk) pair
        p = jnp.exp(reference.logits(q, k, allowed) - lse[..., None])  # [B, K, G, Tc, Sc], softmax from the lse
        dv = reference.dot("BKGTS,BTKGH->BSKH", p.astype(v.dtype), do)
        dp = reference.dot("BTKGH,BSKH->BKGTS", do, v)
        ds = (p * (dp - delta[..., None]) * h**-0.5).astype(q.dtype)  # float32, then the compute dtype
        dq = reference.dot("BKGTS,BSKH->BTKGH", ds, k)
        dk = reference.dot("BKGTS,BTKGH->BSKH", ds, qg)
        return dq, dk, dv

    def block_grads(k, v, kv_seg, kv_idx):
        """(dq, dk, dv) of one K/V block over (query chunk, key chunk) pairs, skipping invisible ones."""
        cq, ck = _chunk(t, _Q_CHUNK), _chunk(k.shape[1], _KV_CHUNK)
        kv = tuple(_split(x, ck) for x in (k, v, kv_seg, kv_idx))

        def q_chunk(dkv, xs):
            qc, qgc, doc, deltac, lsec, seg_q, idx_q = xs

            def kv_chunk(dq, ys):
                kc, vc, seg, idx = ys
                allowed = reference.mask(seg_q, seg, idx_q, idx)
                g_q, g_k, g_v = jax.lax.cond(
                    jnp.any(allowed), lambda: chunk_grads(qc, qgc, doc, deltac, lsec, kc, vc, allowed),
                    lambda: (zeros(dq), zeros(kc), zeros(vc)))
                return dq + g_q, (g_k, g_v)

            dq, (dk, dv) = jax.lax.scan(kv_chunk, zeros(qgc), kv)
            return (dkv[0] + _unsplit(dk), dkv[1] + _unsplit(dv)), dq

        xs = (*(_split(x, cq) for x in (q, qg, do)), _split(delta, cq, 3), _split(lse, cq, 3),
              _split(q_seg, cq), _split(q_idx, cq))
        (dk, dv), dq = jax.lax.scan(q_chunk, (zeros(k), zeros(v)), xs)
        return _unsplit(dq), dk, dv

    def step(carry, _):
        dq, k, v, dk, dv, kv_seg, kv_idx = carry
        g_q, g_k, g_v = block_grads(k, v, kv_seg, kv_idx)
        k, v, dk, dv, kv_seg, kv_idx = _shift(axis, ring, k, v, dk + g_k, dv + g_v, kv_seg, kv_idx)
        return (dq + g_q, k, v, dk, dv, kv_seg, kv_idx), None

    init = (zeros(qg), k, v, zeros(k), zeros(v), kv_seg, kv_idx)
    (dq, _, _, dk, dv, *_), _ = jax.lax.scan(step, init, None, length=ring)
    return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(mesh: Mesh, axis: str = "seq"):
    """An attention function (the signature of yarn_jax.attention) running the ring over `axis` of `mesh`.

    Inputs are global arrays whose sequence dimension is already permuted by `permutation`.
    """
    from yarn_jax import attention

    ring = mesh.shape[axis]
    attend = attention.per_device(functools.partial(_ring, axis, ring), mesh, seq_axis=axis)

    def with_segments(q, k, v, q_seg, kv_seg, q_idx, kv_idx):
        if q_seg is None:  # one document per row: the ring still needs arrays to send around
            q_seg, kv_seg = jnp.ones_like(q_idx), jnp.ones_like(kv_idx)
        return attend(q, k, v, q_seg, kv_seg, q_idx, kv_idx)

    return with_segments
