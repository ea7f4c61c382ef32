"""Attention of a few new tokens to the KV cache (flash-decoding): the filled slots in parts (`splits`), one
partial output and log-sum-exp per part from a single pass over its keys and values in the cache's own
dtype (float32 accumulation), the parts merged in float32 by `merge`, the same merge the seq-sharded
decode (`ring.decode_attention`) applies across devices (after the GPU kernel, the same arithmetic as a
kernel of its own, `_merge_kernel`).

    read(q [B, t, N, H], k, v [L, B, S, K, H], layer [], q_segment_ids [B, t], kv_segment_ids [B, S],
         q_index [B, t], kv_index [B, S], *, window) -> [B, t, N, H]
    attention(platform)(q, k_new, v_new [B, T, K, H], (k, v), layer, slot [B], <read's ids>, *, window)
        -> ([B, t, N, H], (k, v) with row b's T new keys and values at slots slot[b]..+T of `layer`)

Generation calls the second form (`attention`): on GPU the kernel writes the new rows itself, one more
program per (batch row, kv head) attending to them from its inputs while the others read the slots before
them; every other form writes them first (`writing`) and reads with the first form.

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
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from yarn_jax.attention import reference
from yarn_jax.attention.sharded import specs
from yarn_jax.model.execution import divisor_at_most

PROGRAMS = 1024  # programs the GPU kernel aims for (batch rows x kv heads x parts): several per SM, loads overlapping
BLOCK = 128  # keys per block of the GPU kernel (the cache length, a multiple of 256, is whole blocks)
XLA_PART = 512  # slots per part of the XLA form
NEW_ROWS = 16  # new keys the GPU kernel writes and attends to in one tensor-core dot (more: written first)


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
    c = divisor_at_most(s, XLA_PART)
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


def _kernel(bounds_ref, layer_ref, slot_ref, q_ref, *refs, block: int, splits: int, new: int):
    """One (batch row, kv head, part): q_ref [R, H] (the row's new tokens x its G query heads, padded);
    bounds_ref [2, R] (each query row's first and last + 1 slot); layer_ref, slot_ref [1]: the layer, the row's
    first new slot; k_ref, v_ref [L, S, H] (this row's, this head's); o_ref [R, H], lse_ref [R] float32: the part's
    normalised output and log-sum-exp. With `new` > 0 the first `new` rows of kn_ref, vn_ref [NEW_ROWS, H] are the
    row's new keys and values: the cache parts see only the slots before them, and one more part (index
    `splits`) attends to them and writes them into the cache in place (k_out, v_out: k_ref, v_ref aliased)."""
    from jax.experimental import pallas as pl

    if new:
        kn_ref, vn_ref, k_ref, v_ref, o_ref, lse_ref, k_out, v_out = refs
    else:
        k_ref, v_ref, o_ref, lse_ref = refs
    part = pl.program_id(2)
    begins, ends, layer, slot = bounds_ref[0, :], bounds_ref[1, :], layer_ref[0], slot_ref[0]
    q = q_ref[...]
    attend = functools.partial(_attend, q, begins)

    def cached():
        seen = jnp.minimum(ends, slot) if new else ends  # the new slots come from kn_ref, vn_ref
        first = begins.min() // block
        count = jnp.maximum(pl.cdiv(seen.max(), block) - first, 0)  # blocks holding a slot some query sees
        per = pl.cdiv(count, splits)
        lo = first + part * per
        hi = jnp.minimum(lo + per, first + count)

        def body(i, carry):
            at = pl.ds(pl.multiple_of(i * block, block), block)
            return attend(seen, i * block, k_ref[layer, at, :], v_ref[layer, at, :], carry)

        _finish(o_ref, lse_ref, jax.lax.fori_loop(lo, jnp.maximum(hi, lo), body, _empty(q)))

    if not new:
        cached()
        return
    pl.when(part < splits)(cached)

    @pl.when(part == splits)
    def _():
        rows = kn_ref.shape[0]
        real = jnp.arange(rows, dtype=jnp.int32) < new  # padding rows: a slot no query sees
        _finish(o_ref, lse_ref, attend(ends, slot, kn_ref[...], vn_ref[...], _empty(q), real))
        for j in range(new):
            k_out[layer, pl.ds(slot + j, 1), :] = kn_ref[pl.ds(j, 1), :]
            v_out[layer, pl.ds(slot + j, 1), :] = vn_ref[pl.ds(j, 1), :]


def _empty(q):
    """The online softmax's (acc, max, sum) before any key."""
    r, h = q.shape
    return (jnp.zeros((r, h), jnp.float32), jnp.full((r,), reference.MASK_VALUE, jnp.float32),
            jnp.zeros((r,), jnp.float32))


def _attend(q, begins, ends, at, k, v, carry, real=None):
    """The online softmax over one block of keys k, v [C, H] at slots at..at+C-1 (real [C]: keys that
    exist), each query row seeing slots [begins, ends)."""
    from jax.experimental.pallas import triton as plgpu

    acc, m, l_ = carry
    h = q.shape[1]
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * h**-0.5  # [R, C]
    slot = at + jnp.arange(k.shape[0], dtype=jnp.int32)[None, :]
    seen = (slot >= begins[:, None]) & (slot < ends[:, None])
    s = jnp.where(seen if real is None else seen & real[None, :], s, reference.MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None])
    fade = jnp.exp(m - m_new)
    acc = acc * fade[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return acc, m_new, l_ * fade + p.sum(axis=1)


def _finish(o_ref, lse_ref, carry):
    acc, m, l_ = carry
    o_ref[...] = acc / jnp.maximum(l_, 1e-30)[:, None]
    lse_ref[...] = jnp.where(l_ > 0, m + jnp.log(jnp.maximum(l_, 1e-30)), reference.MASK_VALUE)


def splits(programs: int, slots: int, extra: int = 0) -> int:
    """Parts per (batch row, kv head) for `programs` of those over a cache of `slots`: up to PROGRAMS in
    all, each part at least two key blocks of a full cache, and with the `extra` parts (the new keys') a
    power of two, as the merge kernel loads all of a row's parts at once."""
    most = max(1, min(PROGRAMS // programs, slots // (2 * BLOCK))) + extra
    return (1 << (most.bit_length() - 1)) - extra


def _merge_kernel(o_ref, lse_ref, out_ref):
    """`merge` as one kernel, for one query row of one (batch row, kv head) and a slice of its features:
    o_ref [P, C] and lse_ref [P] (float32, the parts' results) -> out_ref [C] in the output's dtype. XLA
    makes three reductions and a divide of `merge`, each a kernel of its own at ~1.4 us."""
    lse = lse_ref[...]
    w = jnp.exp(lse - lse.max())  # [P]
    out_ref[...] = ((w[:, None] * o_ref[...]).sum(axis=0) / w.sum()).astype(out_ref.dtype)


def fits_kernel(h: int, s: int) -> bool:
    """Shapes the GPU kernel takes: a power-of-two head dim of at least 16, whole key blocks."""
    return h >= 16 and h & (h - 1) == 0 and s % BLOCK == 0


def attention_pallas(q, k, v, layer, q_seg, kv_seg, q_idx, kv_idx, *, window=None, interpret=False):
    """The GPU kernel reading the cache (`interpret`: Pallas' interpreter, any platform): see the module
    docstring."""
    return _pallas(q, k, v, layer, q_idx, window, interpret=interpret)[0]


def attention_pallas_write(q, k_new, v_new, cache, layer, slot, q_seg, kv_seg, q_idx, kv_idx, *, window=None,
                           interpret=False):
    """The GPU kernel that also writes the new keys and values k_new, v_new [B, T, K, H] into the cache
    (k, v) [L, B, S, K, H] at `layer`, each row b at slots slot[b]..+T, in place; T <= t, the new tokens
    being the first T of q's. Returns (out, cache)."""
    out, k, v = _pallas(q, *cache, layer, q_idx, window, (k_new, v_new), slot, interpret)
    return out, (k, v)


def _pallas(q, k, v, layer, q_idx, window, new=None, slot=None, interpret=False):
    """(out [B, t, N, H], k, v): the kernel over parts of the cache (and, with `new`, one more part over the
    new keys, which it writes in place)."""
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
    slot = jnp.zeros((b, 1), jnp.int32) if slot is None else jnp.broadcast_to(slot, (b,)).astype(jnp.int32)[:, None]
    # apart from the slots (the same array for every layer): a decode step's unrolled layer loop passes a
    # constant `layer`, which then costs no kernel (stacked with the slots it took one a layer)
    layer = jnp.full((b, 1), layer, jnp.int32)
    parts = splits(b * kh, s, int(new is not None))
    by_row = lambda *shape: pl.BlockSpec((None, *shape), lambda r, j, p: (r,) + (0,) * len(shape))  # noqa: E731
    by_head = lambda rows_: pl.BlockSpec((None, None, rows_, h), lambda r, j, p: (r, j, 0, 0))  # noqa: E731
    slab = pl.BlockSpec((layers, None, s, None, h), lambda r, j, p: (0, r, 0, j, 0))  # a row's, a kv head's
    args, in_specs, written = [lo_hi, layer, slot, qr], [by_row(2, rp), by_row(1), by_row(1), by_head(rp)], 0
    if new is not None:  # keys and values [B, T, K, H] -> one [B, 2K, NEW_ROWS, H], read at kv head j and K + j
        written = new[0].shape[1]
        kv = jnp.concatenate(new, axis=2).transpose(0, 2, 1, 3).astype(k.dtype)
        kv = jnp.pad(kv, ((0, 0), (0, 0), (0, NEW_ROWS - written), (0, 0)))  # the rows of one tensor-core dot
        args += [kv, kv]
        in_specs += [pl.BlockSpec((None, None, NEW_ROWS, h), lambda r, j, p, off=off: (r, j + off, 0, 0))
                     for off in (0, kh)]
    cache_out = [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2 if new is not None else []
    outs, lses, *cache = pl.pallas_call(
        functools.partial(_kernel, block=BLOCK, splits=parts, new=written),
        grid=(b, kh, parts + (new is not None)),
        in_specs=in_specs + [slab, slab],
        out_specs=[pl.BlockSpec((None, None, None, rp, h), lambda r, j, p: (r, j, p, 0, 0)),
                   pl.BlockSpec((None, None, None, rp), lambda r, j, p: (r, j, p, 0))] + [slab] * len(cache_out),
        out_shape=[jax.ShapeDtypeStruct((b, kh, parts + (new is not None), rp, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, parts + (new is not None), rp), jnp.float32)] + cache_out,
        input_output_aliases={len(args): 2, len(args) + 1: 3} if new is not None else {},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="flash_decode",
    )(*args, k, v)
    out = merge_pallas(outs, lses, t, g, q.dtype, interpret).reshape(b, t, n, h)
    return (out, *cache) if cache else (out, k, v)


def merge_pallas(outs: jax.Array, lses: jax.Array, t: int, g: int, dtype: Any, interpret: bool = False) -> jax.Array:
    """The GPU kernel's parts, outs [B, K, P, R, H] and lses [B, K, P, R] (R >= t x G rows: each new token's
    G query heads, then padding), merged by `_merge_kernel` -> [B, t, K, G, H] in `dtype`, each row written
    where the model reads it ([B, t, N, H] as a reshape)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    b, kh, p, _, h = outs.shape
    c = max(16, h // 4)  # features a program: up to four programs a row, each a part of the bytes (NOTES.md)
    return pl.pallas_call(
        _merge_kernel, grid=(b, kh, t * g, h // c),
        in_specs=[pl.BlockSpec((None, None, p, None, c), lambda r, j, i, f: (r, j, 0, i, f)),
                  pl.BlockSpec((None, None, p, None), lambda r, j, i, f: (r, j, 0, i))],
        out_specs=pl.BlockSpec((None, None, None, None, c), lambda r, j, i, f: (r, i // g, j, i % g, f)),
        out_shape=jax.ShapeDtypeStruct((b, t, kh, g, h), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=8 if p * c > 8192 else 4, num_stages=1),
        interpret=interpret, name="flash_decode_merge",
    )(outs, lses)


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


def write(cache: jax.Array, new: jax.Array, layer: jax.Array, slot: jax.Array | None, whole: bool) -> jax.Array:
    """cache [L, B, S, K, H] with new [B, T, K, H] written at `layer`, each row b at slots slot[b]..+T
    (None: the whole layer, T = S), in place inside the layer loop. whole: the cache is on one device (not
    split over a mesh, where a scatter lets each device keep its own slots)."""
    new = new.astype(cache.dtype)
    if slot is None:
        return jax.lax.dynamic_update_index_in_dim(cache, new, layer, axis=0)
    b, t = new.shape[:2]
    if b == 1 and whole:  # one slice in place; a scatter adds a bounds check (read the old row, select, write)
        return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, slot[0], 0, 0))
    return cache.at[layer, jnp.arange(b)[:, None], slot[:, None] + jnp.arange(t)].set(new, mode="promise_in_bounds")


def writing(read, whole: bool):
    """A decode attention that reads the cache (`attention_xla`'s signature) as one that takes the new
    keys and values: written first (`write`), then read with the rest."""

    def attend(q, k_new, v_new, cache, layer, slot, q_seg, kv_seg, q_idx, kv_idx, *, window=None):
        cache = tuple(write(c, x, layer, slot, whole) for c, x in zip(cache, (k_new, v_new), strict=True))
        return read(q, *cache, layer, q_seg, kv_seg, q_idx, kv_idx, window=window), cache

    return attend


def reading(platform: str):
    """The decode attention reading the cache for `platform` ('gpu': the kernel where the dtype and shapes
    allow)."""
    if platform != "gpu":
        return attention_xla

    def attend(q, k, v, *args, window=None):
        return (attention_pallas if _fused(q, k) else attention_xla)(q, k, v, *args, window=window)

    return attend


def attention(platform: str):
    """Generation's attention on one device: fn(q, k_new, v_new, cache (k, v), layer, slot, q_seg, kv_seg,
    q_idx, kv_idx, *, window) -> (out, cache with the new rows written). On GPU the kernel writes them
    itself (no kernels of their own in a decode step) where the dtype and shapes allow."""
    xla = writing(attention_xla, whole=True)
    if platform != "gpu":
        return xla

    def attend(q, k_new, v_new, cache, *args, window=None):
        fn = attention_pallas_write if _fused(q, cache[0]) and k_new.shape[1] <= NEW_ROWS else xla
        return fn(q, k_new, v_new, cache, *args, window=window)

    return attend


def _fused(q, k) -> bool:
    return k.dtype in (jnp.float16, jnp.bfloat16) and fits_kernel(q.shape[-1], k.shape[2])
