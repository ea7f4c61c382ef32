"""Attention of a few new tokens to the KV cache (flash-decoding): the filled slots in parts (`splits`), one
partial output and log-sum-exp per part from a single pass over its keys and values in the cache's own
dtype (float32 accumulation), the parts merged in float32 by `merge`, the same merge the seq-sharded
decode (`ring.decode_attention`) applies across devices.

    fn(q [B, t, N, H], k, v [L, B, S, K, H], layer [], q_segment_ids [B, t], kv_segment_ids [B, S],
       q_index [B, t], kv_index [B, S], *, window) -> [B, t, N, H]

The whole cache comes in with the layer to read (`layer`), so that no layer's slice is ever copied out of
it. Here the cache is in token order (slot j holds token j of its row): a query at token index i sees
slots [max(0, i - window + 1), i], which the token indices alone decide; the segment ids and kv_index
(the same order) are not read.

On GPU (float16 / bfloat16 caches) a Pallas Triton kernel, one program per (batch row, kv head, part):
the G query heads of every new token of the row together against one kv head (GQA without repeating K/V;
new tokens share one read of the cache), looping over the key blocks of its part of the slots its queries
see only, so slots not yet filled cost nothing. Elsewhere (CPU, TPU, float32) the
same arithmetic in XLA over every slot, masked. The kernel uses jax.experimental.pallas.triton (Pallas'
Triton backend, deprecated from jax 0.11 in favour of Mosaic GPU): tested with jax 0.10.2 (its
interpreter, and lowered to Triton IR for CUDA on a CPU host) and 0.11.2 (compiled, H200).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from yarn_jax.attention import reference
from yarn_jax.attention.sharded import specs

PROGRAMS = 1024  # programs the GPU kernel aims for (batch rows x kv heads x parts): several per SM, loads overlapping
BLOCK = 128  # keys per block of the GPU kernel (the cache length, a multiple of 256, is whole blocks)
XLA_PART = 512  # slots per part of the XLA form


def merge(outs: jax.Array, lses: jax.Array, axis: int) -> jax.Array:
    """Partial results merged through their log-sum-exp: outs [..., P, ..., H] (P at `axis`) and lses
    [..., P, ...] float32 -> [..., ...., H] float32. A part that saw no key (lse ~ MASK_VALUE) weighs 0."""
    w = jnp.exp(lses - lses.max(axis=axis, keepdims=True))
    return (w[..., None] * outs).sum(axis=axis) / w.sum(axis=axis)[..., None]


def bounds(q_index: jax.Array, window: int | None) -> jax.Array:
    """[B, t] token indices -> [B, t, 2] int32 (begin, end): the slots each query sees in a cache in
    token order."""
    end = q_index.astype(jnp.int32) + 1
    begin = jnp.zeros_like(end) if window is None else jnp.maximum(end - window, 0)
    return jnp.stack([begin, end], axis=-1)


def _partials_xla(q, k, v, seen):
    """q [B, t, K, G, H]; k, v [B, S, K, H]; seen [B, t, S] bool -> (outs [B, t, K, G, P, H], lses
    [B, t, K, G, P]) float32 over parts of XLA_PART slots."""
    b, s, kh, h = k.shape
    c = math.gcd(s, XLA_PART)
    ks, vs = (x.reshape(b, s // c, c, kh, h) for x in (k, v))  # [B, P, C, K, H]
    logits = reference.dot("BTKGH,BPCKH->BTKGPC", q, ks) * h**-0.5
    seen = seen.reshape(*seen.shape[:2], 1, 1, s // c, c)
    logits = jnp.where(seen, logits, reference.MASK_VALUE)
    m = logits.max(axis=-1)  # [B, t, K, G, P]
    p = jnp.where(seen, jnp.exp(logits - m[..., None]), 0.0)
    l_ = p.sum(axis=-1)
    outs = reference.dot("BTKGPC,BPCKH->BTKGPH", p.astype(v.dtype), vs) / jnp.maximum(l_, 1e-30)[..., None]
    return outs, jnp.where(l_ > 0, m + jnp.log(jnp.maximum(l_, 1e-30)), reference.MASK_VALUE)


def attention_xla(q, k, v, layer, q_seg, kv_seg, q_idx, kv_idx, *, window=None):
    """The XLA form (any platform): see the module docstring."""
    b, t, n, h = q.shape
    kh = k.shape[3]
    k, v = k[layer], v[layer]  # [B, S, K, H]: this layer's slice of the carried cache
    lo_hi = bounds(q_idx, window)
    slots = jnp.arange(k.shape[1], dtype=jnp.int32)
    seen = (slots >= lo_hi[..., :1]) & (slots < lo_hi[..., 1:])  # [B, t, S]
    outs, lses = _partials_xla(q.reshape(b, t, kh, n // kh, h), k, v, seen)
    return merge(outs, lses, axis=4).reshape(b, t, n, h).astype(q.dtype)


# ----------------------------------------------------------------------------- the GPU kernel


def _kernel(bounds_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block: int, splits: int):
    """One (batch row, kv head, part): q_ref [R, H] (the row's new tokens x its G query heads, padded);
    bounds_ref [2, R] (each query row's first and last + 1 slot); k_ref, v_ref [L, S, H] (this row's, this
    head's); o_ref [R, H], lse_ref [R] float32: the part's normalised output and log-sum-exp."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    part = pl.program_id(2)
    begins, ends, layer = bounds_ref[0, :], bounds_ref[1, :], layer_ref[0]
    first = begins.min() // block
    count = pl.cdiv(ends.max(), block) - first  # blocks holding a slot some query sees, split over the parts
    per = pl.cdiv(count, splits)
    lo = first + part * per
    hi = jnp.minimum(lo + per, first + count)
    q = q_ref[...]
    r, h = q.shape
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(i, carry):
        acc, m, l_ = carry
        at = pl.ds(pl.multiple_of(i * block, block), block)
        s = plgpu.dot(q, k_ref[layer, at, :], trans_b=True, precision=precision) * h**-0.5  # [R, block]
        slot = i * block + jnp.arange(block, dtype=jnp.int32)[None, :]
        s = jnp.where((slot >= begins[:, None]) & (slot < ends[:, None]), s, reference.MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        fade = jnp.exp(m - m_new)
        v = v_ref[layer, at, :]
        acc = acc * fade[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l_ * fade + p.sum(axis=1)

    init = (jnp.zeros((r, h), jnp.float32), jnp.full((r,), reference.MASK_VALUE, jnp.float32),
            jnp.zeros((r,), jnp.float32))
    acc, m, l_ = jax.lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
    o_ref[...] = acc / jnp.maximum(l_, 1e-30)[:, None]
    lse_ref[...] = jnp.where(l_ > 0, m + jnp.log(jnp.maximum(l_, 1e-30)), reference.MASK_VALUE)


def splits(programs: int, slots: int) -> int:
    """Parts per (batch row, kv head) for `programs` of those over a cache of `slots`: PROGRAMS in all,
    each part at least two key blocks of a full cache."""
    return max(1, min(PROGRAMS // programs, slots // (2 * BLOCK)))


def fits_kernel(h: int, s: int) -> bool:
    """Shapes the GPU kernel takes: a power-of-two head dim of at least 16, whole key blocks."""
    return h >= 16 and h & (h - 1) == 0 and s % BLOCK == 0


def attention_pallas(q, k, v, layer, q_seg, kv_seg, q_idx, kv_idx, *, window=None, interpret=False):
    """The GPU kernel (`interpret`: Pallas' interpreter, any platform): see the module docstring."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, t, n, h = q.shape
    layers, _, s, kh, _ = k.shape
    g = n // kh
    rows = t * g  # a kv head's query rows in a batch row: its G heads of every new token, read against it once
    rp = max(16, 1 << (rows - 1).bit_length())  # the query rows of a tensor-core dot: a power of two >= 16
    qr = q.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kh, rows, h)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rp - rows), (0, 0))).astype(k.dtype)  # [B, K, R, H]
    none = jnp.broadcast_to(jnp.asarray([s, 0], jnp.int32), (b, rp - rows, 2))  # padding rows: no slot seen
    lo_hi = jnp.concatenate([jnp.repeat(bounds(q_idx, window), g, axis=1), none], axis=1)  # [B, R, 2] as qr's rows
    lo_hi = lo_hi.transpose(0, 2, 1)  # [B, 2, R]
    parts = splits(b * kh, s)
    outs, lses = pl.pallas_call(
        functools.partial(_kernel, block=BLOCK, splits=parts),
        grid=(b, kh, parts),
        in_specs=[pl.BlockSpec((None, 2, rp), lambda r, j, p: (r, 0, 0)),
                  pl.BlockSpec((1,), lambda r, j, p: (0,)),
                  pl.BlockSpec((None, None, rp, h), lambda r, j, p: (r, j, 0, 0)),
                  pl.BlockSpec((layers, None, s, None, h), lambda r, j, p: (0, r, 0, j, 0)),
                  pl.BlockSpec((layers, None, s, None, h), lambda r, j, p: (0, r, 0, j, 0))],
        out_specs=[pl.BlockSpec((None, None, None, rp, h), lambda r, j, p: (r, j, p, 0, 0)),
                   pl.BlockSpec((None, None, None, rp), lambda r, j, p: (r, j, p, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, parts, rp, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, parts, rp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="flash_decode",
    )(lo_hi, jnp.reshape(layer, (1,)).astype(jnp.int32), qr, k, v)
    out = merge(outs[:, :, :, :rows], lses[:, :, :, :rows], axis=2)  # [B, K, t * G, H]
    return out.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


def per_device(fn, mesh: Mesh):
    """`fn` inside shard_map: batch and heads split as the model's activations, every slot of the cache
    on each device (the mesh does not split it)."""
    q_spec, kv_spec, ids = specs(False)
    cache_spec = PartitionSpec(None, *kv_spec)

    def attend(q, k, v, layer, q_seg, kv_seg, q_idx, kv_idx, *, window=None):
        local = lambda q, k, v, layer, q_idx: fn(q, k, v, layer, None, None, q_idx, None, window=window)  # noqa: E731
        return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, cache_spec, cache_spec, PartitionSpec(), ids),
                             out_specs=q_spec, check_vma=False)(q, k, v, layer, q_idx)

    return attend


def attention(platform: str):
    """The decode attention for `platform` ('gpu': the kernel where the dtype and shapes allow)."""
    if platform != "gpu":
        return attention_xla

    def attend(q, k, v, *args, window=None):
        fused = k.dtype in (jnp.float16, jnp.bfloat16) and fits_kernel(q.shape[-1], k.shape[2])
        return (attention_pallas if fused else attention_xla)(q, k, v, *args, window=window)

    return attend
