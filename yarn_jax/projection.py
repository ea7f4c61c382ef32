"""The model's matrix products: `dot` for every projection of a layer (bf16, or FP8 GEMMs with
`fp8_dot`), `logits` for the unembedding (float32 logits, bf16 backward).

    dot(x [B, T, K], w [K, F], fp8) -> [B, T, F];  logits(x [..., D], w [D, V]) -> [..., V] float32
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dot(x: jax.Array, w: jax.Array, fp8: bool = False) -> jax.Array:
    """x [B, T, K] @ w [K, F] -> [B, T, F]: every projection of the model (`fp8`: as `fp8_dot`). A
    single row (a decode step at batch 1) goes in padded to two: GPU XLA turns a one-row dot under 10M
    operand elements (q/k/v/o of a 1B model) into a multiply and a reduction, ~3x slower than the GEMM
    that two rows get; the barrier keeps the padded row from being sliced off before the dot."""
    b, t, k = x.shape
    if fp8:
        return fp8_dot(x.reshape(b * t, k), w).reshape(b, t, -1)
    if b * t != 1:
        return jnp.einsum("BTK,KF->BTF", x, w)
    two = jnp.einsum("RK,KF->RF", jnp.pad(x.reshape(1, -1), ((0, 1), (0, 0))), w)  # [2, F]
    return jax.lax.optimization_barrier(two)[:1].reshape(b, t, -1)


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
