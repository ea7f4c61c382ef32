"""Rotary position embeddings and every context-extension method of the YaRN paper, as pure functions.

    inv_freq, attention_factor = frequencies(rope, seq_len=None)     # [H/2], float
    cos, sin = cos_sin(positions, inv_freq, attention_factor)        # [B, T, H/2] each
    x = rotate(x, cos, sin)                                          # [B, T, N, H]

Notation (paper, section 2): H head dim, b = `theta`, theta_i = b^(-2i/H), s scale factor,
L = original_max_position_embeddings (pre-trained context), L' the current length.

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
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- validation


def _number(field: str, value: Any, *, integer: bool = False, gt: float | None = None,
            ge: float | None = None) -> Any:
    """Checks one numeric config value; the error names the field and what was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    if integer:
        if not float(value).is_integer():
            raise ValueError(f"{field}: expected an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if gt is not None and not value > gt:
        raise ValueError(f"{field}: expected a value > {gt}, got {value!r}")
    if ge is not None and not value >= ge:
        raise ValueError(f"{field}: expected a value >= {ge}, got {value!r}")
    return value


def _set(obj: Any, field: str, value: Any) -> None:
    object.__setattr__(obj, field, value)


# ----------------------------------------------------------------------------- method configs


@dataclasses.dataclass(frozen=True)
class Default:
    """Plain RoPE (Su et al.): inv_freq_i = b^(-2i/H)."""

    rope_type: ClassVar[str] = "default"


@dataclasses.dataclass(frozen=True)
class Linear:
    """Position Interpolation (Chen et al.): positions divided by s, i.e. inv_freq / s.

    attention_factor (ours, for the ablation of YaRN's parts; transformers' `linear` has none): cos and sin
    scaled as YaRN's sqrt(1/t) scales them; None = 1.
    """

    factor: float
    attention_factor: float | None = None
    rope_type: ClassVar[str] = "linear"

    def __post_init__(self):
        _set(self, "factor", _number("rope_scaling.factor", self.factor, ge=1.0))
        if self.attention_factor is not None:
            _set(self, "attention_factor",
                 _number("rope_scaling.attention_factor", self.attention_factor, gt=0.0))


@dataclasses.dataclass(frozen=True)
class NTK:
    """Static NTK-aware base change: b' = b * alpha^(H / (H - 2))."""

    alpha: float
    rope_type: ClassVar[str] = "ntk"

    def __post_init__(self):
        _set(self, "alpha", _number("rope_scaling.alpha", self.alpha, ge=1.0))


@dataclasses.dataclass(frozen=True)
class Dynamic:
    """Dynamic NTK as transformers computes it (`_compute_dynamic_ntk_parameters`), L = max_position_embeddings:
    b' = b * (s * L'/L - (s - 1))^(H / (H - 2)) for L' > L, else b."""

    factor: float
    rope_type: ClassVar[str] = "dynamic"

    def __post_init__(self):
        _set(self, "factor", _number("rope_scaling.factor", self.factor, ge=1.0))


def _check_betas(obj: Any) -> None:
    _set(obj, "beta_fast", _number("rope_scaling.beta_fast", obj.beta_fast, gt=0.0))
    _set(obj, "beta_slow", _number("rope_scaling.beta_slow", obj.beta_slow, gt=0.0))
    if not obj.beta_fast > obj.beta_slow:
        raise ValueError(f"rope_scaling.beta_fast: expected a value > beta_slow ({obj.beta_slow}), "
                         f"got {obj.beta_fast}")
    _set(obj, "original_max_position_embeddings",
         _number("rope_scaling.original_max_position_embeddings", obj.original_max_position_embeddings,
                 integer=True, gt=0))


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN = NTK-by-parts + attention temperature (paper eq. 17-20; transformers `_compute_yarn_parameters`).

    attention_factor: overrides sqrt(1/t) = 0.1 ln s + 1. With `mscale` and `mscale_all_dim` both set
    (DeepSeek), the factor is m(s, mscale) / m(s, mscale_all_dim), m(s, k) = 0.1 k ln s + 1.
    truncate: floor/ceil the correction range to whole dimensions (the original code always does).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    rope_type: ClassVar[str] = "yarn"

    def __post_init__(self):
        _set(self, "factor", _number("rope_scaling.factor", self.factor, ge=1.0))
        _check_betas(self)
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _set(self, name, _number(f"rope_scaling.{name}", getattr(self, name)))
        if self.attention_factor is not None:
            _set(self, "attention_factor",
                 _number("rope_scaling.attention_factor", self.attention_factor, gt=0.0))
        if not isinstance(self.truncate, bool):
            raise ValueError(f"rope_scaling.truncate: expected true or false, got {self.truncate!r}")


@dataclasses.dataclass(frozen=True)
class DynamicYarn:
    """The original YaRN code's dynamic variant (`LlamaDynamicYaRNScaledRotaryEmbedding`), for inference.

    For L' > max_position_embeddings: YaRN with s = L'/L. Otherwise, with `finetuned`, YaRN with
    s = max_position_embeddings / L; without it, plain RoPE. The ramp is always truncated.
    """

    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    finetuned: bool = False
    rope_type: ClassVar[str] = "dynamic_yarn"

    def __post_init__(self):
        _check_betas(self)
        if not isinstance(self.finetuned, bool):
            raise ValueError(f"rope_scaling.finetuned: expected true or false, got {self.finetuned!r}")


@dataclasses.dataclass(frozen=True)
class Llama3:
    """Llama 3.1's frequency-banded scaling (transformers `_compute_llama3_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    rope_type: ClassVar[str] = "llama3"

    def __post_init__(self):
        _set(self, "factor", _number("rope_scaling.factor", self.factor, ge=1.0))
        _set(self, "original_max_position_embeddings",
             _number("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
                     integer=True, gt=0))
        _set(self, "low_freq_factor", _number("rope_scaling.low_freq_factor", self.low_freq_factor, gt=0.0))
        _set(self, "high_freq_factor", _number("rope_scaling.high_freq_factor", self.high_freq_factor, gt=0.0))
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("rope_scaling.high_freq_factor: expected a value > low_freq_factor "
                             f"({self.low_freq_factor}), got {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LongRope:
    """LongRoPE (transformers `_compute_longrope_parameters`): per-frequency factors, long ones past L."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float | None = None
    attention_factor: float | None = None
    rope_type: ClassVar[str] = "longrope"

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"rope_scaling.{name}: expected a list of numbers, got {values!r}")
            _set(self, name, tuple(_number(f"rope_scaling.{name}", v, gt=0.0) for v in values))
        _set(self, "original_max_position_embeddings",
             _number("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
                     integer=True, gt=0))
        if self.factor is not None:
            _set(self, "factor", _number("rope_scaling.factor", self.factor, ge=1.0))
        if self.attention_factor is not None:
            _set(self, "attention_factor",
                 _number("rope_scaling.attention_factor", self.attention_factor, gt=0.0))


Scaling = Default | Linear | NTK | Dynamic | Yarn | DynamicYarn | Llama3 | LongRope
SCALINGS: dict[str, type] = {c.rope_type: c for c in (Default, Linear, NTK, Dynamic, Yarn, DynamicYarn,
                                                       Llama3, LongRope)}
# Keys that belong to the whole rope dict rather than to one method (transformers 5 puts rope_theta
# inside rope_parameters); `dynamic_yarn` accepts `factor` as the original configs wrote it and ignores it
# there, because its scale comes from the lengths.
_SHARED_KEYS = {"rope_type", "type", "rope_theta"}
_IGNORED_KEYS = {DynamicYarn: {"factor"}}


@dataclasses.dataclass(frozen=True)
class Rope:
    """Everything `frequencies` needs: the head dim, base, trained length and scaling method."""

    head_dim: int
    theta: float = 10000.0
    max_position_embeddings: int = 4096
    scaling: Scaling = Default()

    def __post_init__(self):
        _set(self, "head_dim", _number("head_dim", self.head_dim, integer=True, gt=0))
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even number for rotary pairs, got {self.head_dim}")
        _set(self, "theta", _number("rope_theta", self.theta, gt=1.0))
        _set(self, "max_position_embeddings",
             _number("max_position_embeddings", self.max_position_embeddings, integer=True, gt=0))
        if not isinstance(self.scaling, tuple(SCALINGS.values())):
            raise ValueError(f"rope_scaling: expected one of {sorted(SCALINGS)}, got {self.scaling!r}")
        if isinstance(self.scaling, LongRope):
            for name in ("short_factor", "long_factor"):
                if len(getattr(self.scaling, name)) != self.head_dim // 2:
                    raise ValueError(f"rope_scaling.{name}: expected {self.head_dim // 2} values (head_dim / 2), "
                                     f"got {len(getattr(self.scaling, name))}")


def scaling_from_dict(d: dict[str, Any] | None, max_position_embeddings: int) -> Scaling:
    """Reads a transformers-style `rope_scaling` / `rope_parameters` dict (key `rope_type` or `type`).

    Defaults follow transformers: yarn/llama3/longrope take original_max_position_embeddings =
    max_position_embeddings when absent, and yarn's factor = max / original when absent.
    """
    if not d:
        return Default()
    if not isinstance(d, dict):
        raise ValueError(f"rope_scaling: expected a dict, got {d!r}")
    name = d.get("rope_type", d.get("type", "default"))
    if name == "dynamic-yarn":  # spelling of the original YaRN code
        name = "dynamic_yarn"
    if name not in SCALINGS:
        raise ValueError(f"rope_scaling.rope_type: unknown rope type {name!r}; expected one of {sorted(SCALINGS)}")
    cls = SCALINGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
    if cls is NTK and "alpha" not in kwargs and "factor" in d:
        kwargs["alpha"] = d["factor"]
        fields = fields | {"factor"}
    unknown = sorted(set(d) - fields - _SHARED_KEYS - _IGNORED_KEYS.get(cls, set()))
    if unknown:
        warnings.warn(f"rope_scaling: keys {unknown} are not used by rope type {name!r} and are ignored",
                      stacklevel=2)
    if "original_max_position_embeddings" in fields:
        kwargs.setdefault("original_max_position_embeddings", max_position_embeddings)
    if cls is Yarn and "factor" not in kwargs:
        kwargs["factor"] = max_position_embeddings / kwargs["original_max_position_embeddings"]
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in kwargs and f.default is dataclasses.MISSING)
    if missing:
        raise ValueError(f"rope_scaling: rope type {name!r} needs {missing}")
    return cls(**kwargs)


def scaling_to_dict(scaling: Scaling) -> dict[str, Any] | None:
    """The inverse of `scaling_from_dict`, in transformers' keys; None for plain RoPE."""
    if isinstance(scaling, Default):
        return None
    d = {k: v for k, v in dataclasses.asdict(scaling).items() if v is not None}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"rope_type": scaling.rope_type, **d}


# ----------------------------------------------------------------------------- frequencies


def _mscale(s: float, k: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 k ln s + 1 for s > 1, else 1."""
    return 0.1 * k * math.log(s) + 1.0 if s > 1 else 1.0


def _plain(theta: float, head_dim: int) -> np.ndarray:
    """theta_i = b^(-2i/H), i < H/2, in float64."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return 1.0 / theta ** exponent


def _correction_dim(num_rotations: float, head_dim: int, theta: float, length: int) -> float:
    """dim(n) = H ln(L / (2 pi n)) / (2 ln b): the dimension that turns n times over L (paper eq. 15)."""
    return head_dim * math.log(length / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_ramp(head_dim: int, theta: float, original_length: int, beta_fast: float, beta_slow: float,
              truncate: bool = True) -> np.ndarray:
    """NTK-by-parts ramp [H/2]: 0 = keep the dimension (extrapolate), 1 = interpolate it by s."""
    low = _correction_dim(beta_fast, head_dim, theta, original_length)
    high = _correction_dim(beta_slow, head_dim, theta, original_length)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers and the original code: avoid a zero-width ramp
    return np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def _by_parts(inv_freq: np.ndarray, s: float, ramp: np.ndarray) -> np.ndarray:
    """inv_freq_i = (theta_i / s) ramp_i + theta_i (1 - ramp_i) (paper eq. 18)."""
    return inv_freq / s * ramp + inv_freq * (1.0 - ramp)


def frequencies(rope: Rope, seq_len: int | None = None, *, dtype: Any = np.float32) -> tuple[np.ndarray, float]:
    """(inv_freq [H/2], attention_factor) for `rope` at current length `seq_len`.

    seq_len only matters for `dynamic`, `dynamic_yarn` and `longrope` (None = not yet extended). Built on
    the host: a numpy array of `dtype` (use float64 for the model: `cos_sin` keeps the extra precision)
    and a Python float; generation passes them to its compiled steps as arguments.
    """
    h, b, sc = rope.head_dim, rope.theta, rope.scaling
    plain = _plain(b, h)
    factor = 1.0
    if isinstance(sc, Default):
        inv = plain
    elif isinstance(sc, Linear):
        inv, factor = plain / sc.factor, sc.attention_factor or 1.0
    elif isinstance(sc, NTK):
        inv = _plain(b * sc.alpha ** (h / (h - 2)), h)
    elif isinstance(sc, Dynamic):
        length = max(rope.max_position_embeddings if seq_len is None else int(seq_len), rope.max_position_embeddings)
        base = b * (sc.factor * length / rope.max_position_embeddings - (sc.factor - 1)) ** (h / (h - 2))
        inv = _plain(base, h)
    elif isinstance(sc, Yarn):
        ramp = yarn_ramp(h, b, sc.original_max_position_embeddings, sc.beta_fast, sc.beta_slow, sc.truncate)
        inv = _by_parts(plain, sc.factor, ramp)
        if sc.attention_factor is not None:
            factor = sc.attention_factor
        elif sc.mscale and sc.mscale_all_dim:
            factor = _mscale(sc.factor, sc.mscale) / _mscale(sc.factor, sc.mscale_all_dim)
        else:
            factor = _mscale(sc.factor)
    elif isinstance(sc, DynamicYarn):
        original = sc.original_max_position_embeddings
        static_scale = rope.max_position_embeddings / original if sc.finetuned else 1.0
        extended = seq_len is not None and seq_len > rope.max_position_embeddings
        s = seq_len / original if extended else static_scale
        ramp = yarn_ramp(h, b, original, sc.beta_fast, sc.beta_slow, True)
        inv, factor = _by_parts(plain, s, ramp), _mscale(s)
    elif isinstance(sc, Llama3):
        inv = _llama3(plain, sc)
    elif isinstance(sc, LongRope):
        inv, factor = _longrope(plain, sc, rope.max_position_embeddings, seq_len)
    else:  # unreachable: Rope validates the type
        raise ValueError(f"rope_scaling: unknown method {sc!r}")
    return np.asarray(inv, dtype), factor


def _llama3(plain: np.ndarray, sc: Llama3) -> np.ndarray:
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / plain
    inv = np.where(wavelen > low_wavelen, plain / sc.factor, plain)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * inv / sc.factor + smooth * inv
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, inv)


def _longrope(plain: np.ndarray, sc: LongRope, max_position_embeddings: int,
              seq_len: int | None) -> tuple[np.ndarray, float]:
    original = sc.original_max_position_embeddings
    factor = sc.factor if sc.factor is not None else max_position_embeddings / original
    if sc.attention_factor is not None:
        attention = sc.attention_factor
    else:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    short, long = np.asarray(sc.short_factor), np.asarray(sc.long_factor)
    return plain / (long if seq_len and seq_len > original else short), attention


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
