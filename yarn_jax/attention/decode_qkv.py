"""A decode step's work before its attention, as one GPU kernel: the layer's RMSNorm, the q|k|v
projection, RoPE and the write of the new key and value into the KV cache (in place).

    fn(x [R, D], scale [D], wt [C, D], cos, sin [R, H/2], k, v [L, B, S, K, H], layer [], slot [],
       *, heads, eps) -> (q [R, N * H], k, v with row 0's key and value at (layer, 0, slot))

where C = (N + 2K) H: wt is the layer's q, k and v matrices side by side, transposed
(`transposed_qkv`), so that each output column's weights are one contiguous row. R rows of one batch
row (a batch-1 decode step's twin rows, `Llama.decode`): all R are projected (q for every row), only
row 0 is written to the cache, as `Attention` does for twins.

At batch 1 a decode step is a chain of small kernels, each paying a latency floor (~8 us for the
q|k|v GEMV whoever writes it: `bench/NOTES.md`); this one replaces the norm, the GEMM, RoPE and the two
cache writes XLA runs as separate kernels. One program per 2W columns of one head: W at c and W at
c + H/2, the pairs RoPE rotates together; each recomputes the row's norm statistic (D values) and reads
its 2W weight rows once. The arithmetic and its roundings are the unfused path's: statistics in
float32, the normed input and the projection rounded to the compute dtype, RoPE in float32 from there;
only the GEMM's summation order differs.

Pallas Triton (as `decode`'s kernel): tested with jax 0.10.2 (its interpreter, and lowered to Triton IR
for CUDA on a CPU host) and 0.11.2 (compiled, H200).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

WIDTH = 4  # columns of each half-head a program owns (2 x WIDTH weight rows)
CHUNK = 512  # input features per step of a program's loop over D
WARPS, STAGES = 4, 3  # Triton's launch settings


def transposed_qkv(q: jax.Array, k: jax.Array, v: jax.Array, dtype) -> jax.Array:
    """A layer's q [D, N, H], k and v [D, K, H] -> wt [(N + 2K) H, D] in `dtype`: the kernel's layout."""
    d = q.shape[0]
    return jnp.concatenate([w.reshape(d, -1) for w in (q, k, v)], axis=1).T.astype(dtype)


def fits(d: int, h: int) -> bool:
    """Shapes the kernel takes: a power-of-two D (loaded whole), H/2 a multiple of WIDTH."""
    return d >= WIDTH and d & (d - 1) == 0 and h % (2 * WIDTH) == 0


def _kernel(x_ref, scale_ref, wt_ref, cos_ref, sin_ref, where_ref, k_in, v_in, q_ref, k_ref, v_ref, *,
            heads: int, kv_heads: int, eps: float):
    """Program p: head p // P, columns j W .. j W + W and H/2 + j W .. of it (P = H / 2W programs a head)."""
    from jax.experimental import pallas as pl

    del k_in, v_in  # aliased to k_ref, v_ref
    p = pl.program_id(0)
    r, d = x_ref.shape
    half = cos_ref.shape[1]
    per_head = half // WIDTH
    head, j = p // per_head, p % per_head
    lo = head * 2 * half + j * WIDTH  # the first of the program's rows of wt
    dtype = x_ref.dtype
    x = x_ref[...].astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)  # [R]

    chunk = min(CHUNK, d)

    def body(i, acc):
        at = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
        normed = scale_ref[at].astype(dtype)[None, :] * (x_ref[:, at].astype(jnp.float32) * inv[:, None]).astype(dtype)
        normed = normed.astype(jnp.float32)[:, None, :]  # [R, 1, chunk]
        return tuple(a + normed * wt_ref[pl.ds(lo + o, WIDTH), at].astype(jnp.float32)[None]
                     for a, o in zip(acc, (0, half), strict=True))  # summed over the chunk once, after the loop

    zero = jnp.zeros((r, WIDTH, chunk), jnp.float32)
    y1, y2 = (y.sum(axis=2).astype(dtype).astype(jnp.float32)
              for y in jax.lax.fori_loop(0, d // chunk, body, (zero, zero)))
    cols = pl.ds(j * WIDTH, WIDTH)
    c, s = cos_ref[:, cols], sin_ref[:, cols]  # [R, W]
    turn = (head < heads + kv_heads).astype(jnp.float32)  # q and k heads rotate, v heads do not
    c, s = turn * c + (1.0 - turn), turn * s
    out1, out2 = ((y1 * c - y2 * s).astype(dtype), (y2 * c + y1 * s).astype(dtype))  # [R, W] each
    layer, slot = where_ref[0], where_ref[1]
    first_row = (jnp.arange(r) == 0)[:, None]  # row 0 by a masked sum: Triton lowers no slice of a value
    row0 = [jnp.sum(jnp.where(first_row, val.astype(jnp.float32), 0.0), axis=0) for val in (out1, out2)]

    @pl.when(head < heads)
    def _():
        for o, val in ((0, out1), (half, out2)):
            q_ref[:, pl.ds(head * 2 * half + j * WIDTH + o, WIDTH)] = val

    for first, ref in ((heads, k_ref), (heads + kv_heads, v_ref)):
        @pl.when((head >= first) & (head < first + kv_heads))
        def _(first=first, ref=ref):
            for o, val in zip((0, half), row0, strict=True):
                ref[layer, 0, slot, head - first, pl.ds(j * WIDTH + o, WIDTH)] = val.astype(ref.dtype)


@functools.partial(jax.jit, static_argnames=("heads", "eps", "interpret"))
def project(x, scale, wt, cos, sin, k, v, layer, slot, *, heads: int, eps: float, interpret: bool = False):
    """See the module docstring."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    r, d = x.shape
    kv_heads, h = k.shape[3], k.shape[4]
    programs = (heads + 2 * kv_heads) * h // (2 * WIDTH)
    where = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(slot, jnp.int32)])
    whole = lambda a: pl.BlockSpec(a.shape, lambda p, n=a.ndim: (0,) * n)  # noqa: E731
    args = (x, scale.astype(x.dtype), wt, cos.astype(jnp.float32), sin.astype(jnp.float32), where, k, v)
    q_shape = jax.ShapeDtypeStruct((r, heads * h), x.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, heads=heads, kv_heads=kv_heads, eps=eps),
        grid=(programs,),
        in_specs=[whole(a) for a in args],
        out_specs=[whole(q_shape), whole(k), whole(v)],
        out_shape=[q_shape, jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        input_output_aliases={6: 1, 7: 2},
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=STAGES),
        interpret=interpret, name="decode_qkv",
    )(*args)
