"""Rotary position embeddings: the frequencies of a model's RoPE and their application, as pure functions.

    inv_freq, attention_factor = frequencies(rope, seq_len=None)     # [H/2], float
    cos, sin = cos_sin(positions, inv_freq, attention_factor)        # [B, T, H/2] each
    x = rotate(x, cos, sin)                                          # [B, T, N, H]

The scaling methods (PI, NTK, YaRN, ...) and their formulas are in `scaling.py`; `Rope` adds what every
method needs: the head dim H, base b = `theta` and trained length.

Layout is Hugging Face's rotate-half (first half of H paired with second half), so weights
convert with transposes only. The attention factor (YaRN's sqrt(1/t)) multiplies cos and sin,
as transformers and the original code do, which scales q.k by its square.

Precision: positions up to 2^24 are reduced modulo one turn exactly in float32 (see `_turns`),
so cos/sin at position 131072 are correct to ~1e-6 instead of the ~1e-2 that a plain float32
`positions * inv_freq` gives there, on every platform and with no float64 on the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from yarn_jax.model import scaling as scaling_lib
from yarn_jax.model.validate import number, set_field


@dataclasses.dataclass(frozen=True)
class Rope:
    """Everything `frequencies` needs: the head dim, base, trained length and scaling method."""

    head_dim: int
    theta: float = 10000.0
    max_position_embeddings: int = 4096
    scaling: scaling_lib.Scaling = scaling_lib.Default()

    def __post_init__(self):
        set_field(self, "head_dim", number("head_dim", self.head_dim, integer=True, gt=0))
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even number for rotary pairs, got {self.head_dim}")
        set_field(self, "theta", number("rope_theta", self.theta, gt=1.0))
        set_field(self, "max_position_embeddings",
                  number("max_position_embeddings", self.max_position_embeddings, integer=True, gt=0))
        if not isinstance(self.scaling, tuple(scaling_lib.SCALINGS.values())):
            raise ValueError(f"rope_scaling: expected one of {sorted(scaling_lib.SCALINGS)}, got {self.scaling!r}")
        if isinstance(self.scaling, scaling_lib.LongRope):
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.scaling, name)) != self.head_dim // 2:
                    raise ValueError(f"rope_scaling.{name}: expected {self.head_dim // 2} values (head_dim / 2), "
                                     f"got {len(getattr(self.scaling, name))}")


def frequencies(rope: Rope, seq_len: int | None = None, *, dtype: Any = np.float32) -> tuple[np.ndarray, float]:
    """(inv_freq [H/2], attention_factor) for `rope` at current length `seq_len`.

    seq_len only matters for `dynamic`, `dynamic_yarn` and `longrope` (None = not yet extended). Built on
    the host: a numpy array of `dtype` (use float64 for the model: `cos_sin` keeps the extra precision)
    and a Python float; generation passes them to its compiled steps as arguments.
    """
    inv, factor = rope.scaling.frequencies(rope.head_dim, rope.theta, rope.max_position_embeddings, seq_len)
    return np.asarray(inv, dtype), float(factor)


# ----------------------------------------------------------------------------- applying


def _top_bits(x: Any, bits: int = 12) -> Any:
    """x rounded toward zero to `bits` significant bits (exact in float32)."""
    xp = jnp if isinstance(x, jax.Array) else np
    mantissa, exponent = xp.frexp(x)
    return xp.ldexp(xp.trunc(mantissa * 2.0 ** bits) / 2.0 ** bits, exponent)


def turn_parts(inv_freq: Any) -> tuple[Any, Any, Any]:
    """inv_freq / 2pi split into three float32 parts, the first two with 12 significant bits each
    (computed in float64 on the host for numpy input; an already split triple is returned as is)."""
    if isinstance(inv_freq, tuple):
        return inv_freq
    if isinstance(inv_freq, jax.Array):  # traced: precision is already that of the float32 input
        t = inv_freq.astype(jnp.float32) / jnp.float32(2 * math.pi)
    else:
        t = np.asarray(inv_freq, np.float64) / (2 * math.pi)
    hi = _top_bits(t)
    mid = _top_bits(t - hi)
    if isinstance(t, np.ndarray):  # keep numpy: constants under jit, exactly split
        return hi.astype(np.float32), mid.astype(np.float32), (t - hi - mid).astype(np.float32)
    return hi, mid, t - hi - mid


def _frac(x: jax.Array) -> jax.Array:
    return x - jnp.round(x)  # exact in floating point: round(x) is within 1/2 of x


def _turns(positions: jax.Array, inv_freq: Any) -> jax.Array:  # inv_freq: [H/2] or its turn_parts
    """positions * inv_freq / 2pi modulo 1, in [-1/2, 1/2]: [..., T] x [H/2] -> [..., T, H/2] float32.

    Positions split into a multiple of 4096 and a 12-bit rest, frequencies into 12-bit parts: every
    product then has at most 24 significant bits, so it and its reduction modulo one turn are exact.
    """
    hi, mid, lo = turn_parts(inv_freq)
    p = positions.astype(jnp.int32)[..., None]
    p_hi = (p & ~4095).astype(jnp.float32)
    p_lo = (p & 4095).astype(jnp.float32)
    big = _frac(p_hi * hi) + _frac(p_hi * mid)
    small = _frac(p_lo * hi) + (p_lo * mid + p.astype(jnp.float32) * lo)
    return _frac(_frac(big) + _frac(small))


def cos_sin(positions: jax.Array, inv_freq: Any, attention_factor: Any = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles times the attention factor: [..., T] -> 2 x [..., T, H/2] float32."""
    angles = jnp.float32(2 * math.pi) * _turns(positions, inv_freq)
    factor = jnp.asarray(attention_factor, jnp.float32)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE: x [B, T, N, H] with cos/sin [B, T, H/2]; computed in float32, returned in x.dtype."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: Any, attention_factor: Any = 1.0) -> jax.Array:
    """x [B, T, N, H] rotated by positions [B, T] (true global positions, never an internal arange)."""
    return rotate(x, *cos_sin(positions, inv_freq, attention_factor))
