"""The layers' operations besides their matrix products, with their own backward rules: RMSNorm and
SwiGLU's gating, silu(a) * b. Each keeps for the backward what Liger's fused kernels keep, not what autodiff
of the formula would (float32 copies, the activation's parts), and computes its gradients in float32.

    rms_norm(x [..., D], scale [D], eps, dtype) -> [..., D] in dtype;  silu_mul(a, b [..., F]) -> [..., F]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """x [..., D] / rms(x) * scale [D]: the statistics in float32, the result and the scale in `dtype`.

    Its backward keeps x as given and the float32 reciprocal rms [..., 1] (as Liger's fused RMSNorm does),
    not a float32 copy of x and the unscaled result: 6 bytes an element less per norm in a step without
    remat. The gradients are computed in float32."""
    return _rms_norm_fwd(x, scale, eps, dtype)[0]


def _rms_norm_fwd(x, scale, eps, dtype):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [..., 1]
    return scale.astype(dtype) * (x32 * inv).astype(dtype), (x, inv, scale)


def _rms_norm_bwd(eps, dtype, res, g):  # g [..., D]
    del eps, dtype
    x, inv, scale = res
    y = x.astype(jnp.float32) * inv
    dy = g.astype(jnp.float32) * scale.astype(jnp.float32)
    # d(x * inv) / dx with inv = rsqrt(mean(x^2) + eps): inv * (dy - y * mean(dy * y))
    dx = inv * (dy - y * jnp.mean(dy * y, axis=-1, keepdims=True))
    dscale = jnp.sum(g.astype(jnp.float32) * y, axis=tuple(range(g.ndim - 1)))
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def silu_mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """silu(a) * b, elementwise in the inputs' dtype. Its backward keeps a and b only and recomputes the
    activation in float32 (as Liger's fused SwiGLU does): autodiff would keep three more [..., F] arrays
    (the sigmoid and the activation's parts) in a step without remat."""
    return _silu_mul_fwd(a, b)[0]


def _silu_mul_fwd(a, b):
    return jax.nn.silu(a) * b, (a, b)


def _silu_mul_bwd(res, g):
    a, b = (r.astype(jnp.float32) for r in res)
    g = g.astype(jnp.float32)
    sig = jax.nn.sigmoid(a)
    da = g * b * sig * (1 + a * (1 - sig))  # d silu(a) / da = sig + a * sig * (1 - sig)
    return da.astype(res[0].dtype), (g * a * sig).astype(res[1].dtype)


silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)
