"""The model's matrix products: `dot` for every projection of a layer (bf16, or FP8 GEMMs with
`fp8_dot`), `logits` for the unembedding (float32 logits, bf16 backward).

    dot(x [B, T, K], w [*k, *f] (prod k = K), fp8, contract=len(k)) -> [B, T, prod f]
    logits(x [..., D], w [D, V]) -> [..., V] float32
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp


def dot(x: jax.Array, w: jax.Array, fp8: bool = False, contract: int = 1) -> jax.Array:
    """x [B, T, K] @ w -> [B, T, F]: every projection of the model, w's first `contract` axes flattened
    to K, the rest to F. w in x's dtype: a plain dot. w in another (the float32 master, as stored):
    `cast_dot`, whose backward keeps the parameter itself rather than a compute-dtype copy; a remat
    policy cannot see into it, so a model under one casts its weights first. `fp8`: as `fp8_dot`.
    A single row (a decode step at batch 1) goes in padded to two: GPU XLA turns a one-row dot under
    10M operand elements (q/k/v/o of a 1B model) into a multiply and a reduction, ~3x slower than the
    GEMM that two rows get; the barrier keeps the padded row from being sliced off before the dot."""
    b, t, k = x.shape
    if fp8:
        return fp8_dot(x.reshape(b * t, k), _matrix(w, contract).astype(x.dtype)).reshape(b, t, -1)

    def product(x):  # [M..., K] -> [M..., F]
        return jnp.einsum("...K,KF->...F", x, _matrix(w, contract)) if w.dtype == x.dtype else cast_dot(x, w, contract)

    if b * t != 1:
        return product(x)
    two = jnp.pad(x.reshape(1, -1), ((0, 1), (0, 0)))  # [2, K]
    return jax.lax.optimization_barrier(product(two))[:1].reshape(b, t, -1)


def _matrix(w: jax.Array, contract: int) -> jax.Array:
    """w [*k, *f] -> [prod k, prod f] (a free reshape)."""
    return w.reshape(math.prod(w.shape[:contract]), -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cast_dot(x: jax.Array, w: jax.Array, contract: int) -> jax.Array:
    """x [..., K] @ (w cast to x's dtype) [K, F] -> [..., F], with autodiff's arithmetic forward and backward
    (the weight's gradient computed in x's dtype, then cast to w's). What differs is what the backward
    keeps: autodiff keeps the cast weight (2 bytes a parameter in bf16: 2.0 GiB at 1.1B, 12.5 at 7B,
    live from the forward to the backward), this keeps w itself (no copy: a parameter, or a layer's slice
    of one that the layer scan forwards) and casts it again in the backward. The recast adds a zero taken
    from g (so it waits for g and is not merged with the forward's cast): equal to autodiff's to the bit
    for finite g (up to the sign of a zero); a non-finite g[0] makes all of dx non-finite, not one row."""
    return jnp.einsum("...K,KF->...F", x, _matrix(w, contract).astype(x.dtype))


def _cast_dot_fwd(x, w, contract):
    return cast_dot(x, w, contract), (x, w)


def _cast_dot_bwd(contract, res, g):  # g [..., F]
    x, w = res
    # a zero that depends on g (XLA keeps x * 0 for floats): the recast can neither be merged with the
    # forward's cast (CSE) nor hoisted before g exists, and it fuses with the slice of a stacked weight
    # (a barrier on (w, g) works too but copies each slice first: the 8k step -2.2% against -1.0%)
    w = w + (g.reshape(-1)[0] * 0).astype(w.dtype)
    dx = jnp.einsum("...F,KF->...K", g, _matrix(w, contract).astype(g.dtype))
    dw = jnp.einsum("...K,...F->KF", x, g)  # in x's dtype, as autodiff's transpose of the cast has it
    return dx, dw.astype(w.dtype).reshape(w.shape)


cast_dot.defvjp(_cast_dot_fwd, _cast_dot_bwd)


def _quantize(x: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """x as FP8 `dtype` with one scale for the whole tensor (its amax onto the format's largest finite
    value): (x / scale in `dtype`, scale float32), x ~ x8 * scale."""
    big = float(jnp.finfo(dtype).max)
    scale = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12) / big)
    return jnp.clip(x.astype(jnp.float32) / scale, -big, big).astype(dtype), scale


def _scaled_dot(a8: jax.Array, b8: jax.Array, scale: jax.Array, dims: tuple, dtype: Any) -> jax.Array:
    """dot_general of two FP8 arrays (float32 accumulation inside the GEMM, the result written in
    `dtype`), times the product of their scales. The operands reach XLA as FP8 arrays, so the GPU
    compiler emits a cuBLASLt FP8 GEMM on Hopper; a quantise-dequantise pair around a bf16 dot would
    not do: with excess precision allowed (XLA's default) the float32 -> FP8 -> bf16 conversions are
    folded into one and the rounding vanishes. The GEMM writes `dtype` (bf16 for activations), not
    float32: half the bytes to write and read back, and what remat `dots` keeps is half the size."""
    out = jax.lax.dot_general(a8, b8, (dims, ((), ())), preferred_element_type=dtype)
    return (out.astype(jnp.float32) * scale).astype(dtype)


@jax.custom_vjp
def fp8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, F] with both operands in float8 e4m3 and the output's cotangent in e5m2 (the
    wider range gradients need), each with a per-tensor scale from its current amax; accumulation in
    float32 (the GEMM's), the result in x's dtype."""
    return _fp8_dot_fwd(x, w)[0]


def _fp8_dot_fwd(x, w):
    (x8, sx), (w8, sw) = _quantize(x, jnp.float8_e4m3fn), _quantize(w, jnp.float8_e4m3fn)
    return _scaled_dot(x8, w8, sx * sw, ((1,), (0,)), x.dtype), (x8, sx, w8, sw, jnp.zeros((), w.dtype))


def _fp8_dot_bwd(res, g):  # g [M, F]
    x8, sx, w8, sw, w_zero = res  # w_zero: a scalar of w's dtype (residuals are arrays)
    g8, sg = _quantize(g, jnp.float8_e5m2)
    dx = _scaled_dot(g8, w8, sg * sw, ((1,), (1,)), g.dtype)  # [M, K]
    dw = _scaled_dot(x8, g8, sx * sg, ((0,), (0,)), w_zero.dtype)  # [K, F]
    return dx, dw


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


@jax.custom_vjp
def logits(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., D] @ w [D, V] -> [..., V] float32 (accumulated and returned in float32).

    The backward casts the logits' cotangent to the inputs' dtype, so both backward matmuls run in it
    (bf16) like every other matmul (the train loss, `loss._nll`, takes its gradient the same way); plain
    autodiff would run them in float32, since the cotangent of a float32 result is float32."""
    return jnp.einsum("...D,DV->...V", x, w, preferred_element_type=jnp.float32)


def _logits_fwd(x, w):
    return logits(x, w), (x, w)


def _logits_bwd(res, g):  # g [..., V] float32
    x, w = res
    g = g.astype(x.dtype)
    return jnp.einsum("...V,DV->...D", g, w), jnp.einsum("...D,...V->DV", x, g).astype(w.dtype)


logits.defvjp(_logits_fwd, _logits_bwd)
