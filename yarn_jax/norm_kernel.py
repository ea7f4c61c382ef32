"""RMSNorm, alone or with the residual add before it, as Pallas Triton kernels (NVIDIA GPUs): one pass
over the rows forward, one backward.

    rms_norm(x [..., D], scale [D], eps, dtype) -> [..., D] in dtype: x / rms(x) * scale, as `llama.rms_norm`
    add_rms_norm(x, a, scale, eps, dtype) -> (s = x + a, rms_norm(s)): a pre-norm layer's residual add and
        the next norm (`Block`'s second norm), s in x's dtype

The forward reads x (and a) and writes the result, s, and each row's reciprocal rms (float32, [M] for M
rows); the backward reads the normalised input, the rms and the result's cotangent (and s's) and writes
dx (with s's cotangent added: d x = d a) and, per block of rows, the partial sums of d(scale), which XLA
adds up ([M / rows, D] float32). XLA's own backward makes three passes over the rows (the row reduction,
dx, and d(scale) as a column reduction over all M rows), and the residual add and its gradient are more.
The arithmetic is `llama.rms_norm`'s: statistics in float32, the normalised row and the scale rounded to
`dtype` and their product rounded once; the backward in float32 from the same rounded scale.

A forward program takes `BLOCK` elements of whole rows (a power of two dividing M); a backward one takes
blocks of `BWD_BLOCK` in a loop, d(scale) summed in registers, so that its partials stay few. D must be a
power of two (Triton's blocks) of at most BWD_BLOCK, else `supported` is false and the caller keeps XLA's
form. `interpret`: Pallas'
interpreter (any platform; the tests run it on CPU). Supported jax: 0.10.2 (interpreter) and 0.11.2 (GPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

BLOCK = 16 * 2048  # elements a forward program (rows of D)
BWD_BLOCK = 4 * 2048  # elements a backward program's iteration
PROGRAMS = 512  # the backward gives each program several blocks of rows while at least this many remain
WARPS = 8


def supported(x: jax.Array) -> bool:
    d = x.shape[-1]
    return d & (d - 1) == 0 and 32 <= d <= BWD_BLOCK


def _rows(m: int, d: int, elements: int) -> int:
    """Rows a block: the largest power of two dividing m with at most `elements` elements (at least one row)."""
    r = max(elements // d, 1)
    while r > 1 and m % r:
        r //= 2
    return r


def _steps(m: int, rows: int) -> int:
    """Blocks of `rows` rows a backward program: a power of two dividing m / rows, leaving >= PROGRAMS programs."""
    steps = 1
    while (m // rows) % (2 * steps) == 0 and m // (rows * 2 * steps) >= PROGRAMS:
        steps *= 2
    return steps


def _fwd_kernel(*refs, eps: float, add: bool):
    """(x, [a,] scale) -> ([s,] y, r): one block of rows."""
    if add:
        x_ref, a_ref, w_ref, s_ref, y_ref, r_ref = refs
        s = x_ref[...] + a_ref[...]  # [R, D] in the residual's dtype, as the model adds
        s_ref[...] = s
    else:
        x_ref, w_ref, y_ref, r_ref = refs
        s = x_ref[...]
    x = s.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=1) + eps)  # [R]
    dt = y_ref.dtype
    w = w_ref[...].astype(dt).astype(jnp.float32)  # [D]
    y_ref[...] = ((x * r[:, None]).astype(dt).astype(jnp.float32) * w[None]).astype(dt)
    r_ref[...] = r


def _bwd_kernel(*refs, dtype: Any, add: bool, rows: int, steps: int):
    """(x, scale, r, dy, [ds,]) -> (dx [+ ds], partial d(scale) [1, D]): `steps` blocks of `rows` rows,
    d(scale) summed over them in registers."""
    from jax.experimental import pallas as pl

    x_ref, w_ref, r_ref, dy_ref, *ds_ref, dx_ref, dw_ref = refs
    w = w_ref[...].astype(dtype).astype(jnp.float32)  # [D]

    def block(j, dw):
        at = pl.ds(j * rows, rows)
        x, r = x_ref[at, :].astype(jnp.float32), r_ref[at]  # [R, D], [R]
        dy = dy_ref[at, :].astype(jnp.float32)
        xh = x * r[:, None]
        g = dy * w[None]  # d(x / rms)
        c = jnp.mean(g * xh, axis=1)  # [R]
        dx = r[:, None] * (g - xh * c[:, None])
        if add:
            dx = dx + ds_ref[0][at, :].astype(jnp.float32)
        dx_ref[at, :] = dx.astype(dx_ref.dtype)
        return dw + jnp.sum(dy * xh.astype(dtype).astype(jnp.float32), axis=0)

    dw_ref[...] = jax.lax.fori_loop(0, steps, block, jnp.zeros(w.shape, jnp.float32))[None]


def _call(kernel, name: str, args, blocks, outs, block_rows: int, interpret: bool):
    """pallas_call over blocks of `block_rows` rows. blocks/outs: each operand's kind: 'rows' [block_rows, D]
    of [M, D], 'stat' [block_rows] of [M], 'whole' [D], 'part' [1, D] of [M / block_rows, D]; outs pair
    kinds with dtypes."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    (m, d), b = args[0].shape, block_rows
    spec = {"rows": pl.BlockSpec((b, d), lambda i: (i, 0)), "stat": pl.BlockSpec((b,), lambda i: (i,)),
            "whole": pl.BlockSpec((d,), lambda i: (0,)), "part": pl.BlockSpec((1, d), lambda i: (i, 0))}
    shape = {"rows": (m, d), "stat": (m,), "part": (m // b, d)}
    return pl.pallas_call(kernel, grid=(m // b,), in_specs=[spec[k] for k in blocks],
                          out_specs=[spec[k] for k, _ in outs],
                          out_shape=[jax.ShapeDtypeStruct(shape[k], dt) for k, dt in outs],
                          compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1),
                          interpret=interpret, name=name)(*args)


def _forward(x, a, scale, eps, dtype, interpret):  # x, a [M, D] -> ([s,] y, r)
    add = a is not None
    kernel = functools.partial(_fwd_kernel, eps=eps, add=add)
    args, blocks = ((x, a, scale), ("rows", "rows", "whole")) if add else ((x, scale), ("rows", "whole"))
    outs = ((("rows", x.dtype),) if add else ()) + (("rows", dtype), ("stat", jnp.float32))
    return _call(kernel, "add_rms_norm_fwd" if add else "rms_norm_fwd", args, blocks, outs,
                 _rows(*x.shape, BLOCK), interpret)


def _backward(x, scale, r, dy, ds, dtype, interpret):  # -> dx [M, D] in x's dtype, d(scale) [D] float32
    add = ds is not None
    rows = _rows(*x.shape, BWD_BLOCK)
    steps = _steps(x.shape[0], rows)
    kernel = functools.partial(_bwd_kernel, dtype=dtype, add=add, rows=rows, steps=steps)
    args = (x, scale, r, dy) + ((ds,) if add else ())
    blocks = ("rows", "whole", "stat", "rows") + (("rows",) if add else ())
    dx, parts = _call(kernel, "add_rms_norm_bwd" if add else "rms_norm_bwd", args, blocks,
                      (("rows", x.dtype), ("part", jnp.float32)), rows * steps, interpret)
    return dx, parts.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any, interpret: bool = False) -> jax.Array:
    """x [..., D] / rms(x) * scale [D] -> [..., D] in `dtype` (`supported(x)` must hold)."""
    return _norm_fwd(x, scale, eps, dtype, interpret)[0]


def _norm_fwd(x, scale, eps, dtype, interpret):
    rows = x.reshape(-1, x.shape[-1])  # [M, D]
    y, r = _forward(rows, None, scale, eps, jnp.dtype(dtype), interpret)
    return y.reshape(x.shape), (rows, scale, r)


def _norm_bwd(eps, dtype, interpret, res, dy):
    rows, scale, r = res
    dx, dscale = _backward(rows, scale, r, dy.reshape(rows.shape), None, jnp.dtype(dtype), interpret)
    return dx.reshape(dy.shape), dscale.astype(scale.dtype)


rms_norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def add_rms_norm(x: jax.Array, a: jax.Array, scale: jax.Array, eps: float, dtype: Any,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(s = x + a [..., D] in x's dtype, rms_norm(s)) (`supported(x)` must hold; a in x's dtype)."""
    return _add_fwd(x, a, scale, eps, dtype, interpret)[0]


def _add_fwd(x, a, scale, eps, dtype, interpret):
    d = x.shape[-1]
    s, y, r = _forward(x.reshape(-1, d), a.reshape(-1, d), scale, eps, jnp.dtype(dtype), interpret)
    return (s.reshape(x.shape), y.reshape(x.shape)), (s, scale, r)


def _add_bwd(eps, dtype, interpret, res, cot):
    s, scale, r = res
    ds, dy = cot  # [..., D] each
    dx, dscale = _backward(s, scale, r, dy.reshape(s.shape), ds.reshape(s.shape), jnp.dtype(dtype), interpret)
    dx = dx.reshape(ds.shape)
    return dx, dx, dscale.astype(scale.dtype)


add_rms_norm.defvjp(_add_fwd, _add_bwd)
