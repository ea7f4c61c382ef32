"""The layers' operations besides their matrix products: RMSNorm and SwiGLU's gating, silu(a) * b.
Autodiff takes their gradients: on GPU, XLA fuses what the backward needs of them into its neighbours
(own backward rules keeping only what Liger's kernels keep changed neither memory nor speed on an H200:
`yarn_jax/bench/NOTES.md`, 2026-12-04).

    rms_norm(x [..., D], scale [D], eps, dtype) -> [..., D] in dtype;  silu_mul(a, b [..., F]) -> [..., F]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """x [..., D] / rms(x) * scale [D]: the statistics in float32, the result and the scale in `dtype`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * y.astype(dtype)


def silu_mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """silu(a) * b, elementwise in the inputs' dtype."""
    return jax.nn.silu(a) * b
