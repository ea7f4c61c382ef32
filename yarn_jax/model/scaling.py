"""The context-extension methods of the YaRN paper (and transformers' others), each a frozen config that
computes its own frequencies:

    inv_freq, attention_factor = scaling.frequencies(head_dim, theta, max_position_embeddings, seq_len)

on the host, in float64. Notation (paper, section 2): H head dim, b = `theta`, theta_i = b^(-2i/H), s scale
factor, L = original_max_position_embeddings (pre-trained context), L' the current length (`seq_len`; None:
not yet extended). Configs are read from and written to transformers' `rope_scaling` dicts.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import numpy as np

from yarn_jax.model.validate import number, set_field

# ----------------------------------------------------------------------------- shared arithmetic


def plain(theta: float, head_dim: int) -> np.ndarray:
    """theta_i = b^(-2i/H), i < H/2, in float64."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return 1.0 / theta ** exponent


def mscale(s: float, k: float = 1.0) -> float:
    """YaRN's sqrt(1/t) = 0.1 k ln s + 1 for s > 1, else 1."""
    return 0.1 * k * math.log(s) + 1.0 if s > 1 else 1.0


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


def by_parts(inv_freq: np.ndarray, s: float, ramp: np.ndarray) -> np.ndarray:
    """inv_freq_i = (theta_i / s) ramp_i + theta_i (1 - ramp_i) (paper eq. 18)."""
    return inv_freq / s * ramp + inv_freq * (1.0 - ramp)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) is not None:
            set_field(obj, name, number(f"rope_scaling.{name}", getattr(obj, name), gt=0.0))


def _factor(obj: Any) -> None:
    set_field(obj, "factor", number("rope_scaling.factor", obj.factor, ge=1.0))


def _original(obj: Any) -> None:
    set_field(obj, "original_max_position_embeddings",
              number("rope_scaling.original_max_position_embeddings", obj.original_max_position_embeddings,
                     integer=True, gt=0))


def _betas(obj: Any) -> None:
    _positive(obj, "beta_fast", "beta_slow")
    if not obj.beta_fast > obj.beta_slow:
        raise ValueError(f"rope_scaling.beta_fast: expected a value > beta_slow ({obj.beta_slow}), "
                         f"got {obj.beta_fast}")
    _original(obj)


def _flag(obj: Any, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise ValueError(f"rope_scaling.{name}: expected true or false, got {getattr(obj, name)!r}")


# ----------------------------------------------------------------------------- the methods


@dataclasses.dataclass(frozen=True)
class Default:
    """Plain RoPE (Su et al.): inv_freq_i = b^(-2i/H)."""

    rope_type: ClassVar[str] = "default"

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        return plain(theta, head_dim), 1.0


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
        _factor(self)
        _positive(self, "attention_factor")

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        return plain(theta, head_dim) / self.factor, self.attention_factor or 1.0


@dataclasses.dataclass(frozen=True)
class NTK:
    """Static NTK-aware base change: b' = b * alpha^(H / (H - 2))."""

    alpha: float
    rope_type: ClassVar[str] = "ntk"

    def __post_init__(self):
        set_field(self, "alpha", number("rope_scaling.alpha", self.alpha, ge=1.0))

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        return plain(theta * self.alpha ** (head_dim / (head_dim - 2)), head_dim), 1.0


@dataclasses.dataclass(frozen=True)
class Dynamic:
    """Dynamic NTK as transformers computes it (`_compute_dynamic_ntk_parameters`), L = max_position_embeddings:
    b' = b * (s * L'/L - (s - 1))^(H / (H - 2)) for L' > L, else b."""

    factor: float
    rope_type: ClassVar[str] = "dynamic"

    def __post_init__(self):
        _factor(self)

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        length = max(max_position_embeddings if seq_len is None else int(seq_len), max_position_embeddings)
        base = theta * (self.factor * length / max_position_embeddings - (self.factor - 1)) ** (
            head_dim / (head_dim - 2))
        return plain(base, head_dim), 1.0


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
        _factor(self)
        _betas(self)
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                set_field(self, name, number(f"rope_scaling.{name}", getattr(self, name)))
        _positive(self, "attention_factor")
        _flag(self, "truncate")

    def temperature(self) -> float:
        """sqrt(1/t), the attention factor."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        return mscale(self.factor)

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        ramp = yarn_ramp(head_dim, theta, self.original_max_position_embeddings, self.beta_fast, self.beta_slow,
                         self.truncate)
        return by_parts(plain(theta, head_dim), self.factor, ramp), self.temperature()


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
        _betas(self)
        _flag(self, "finetuned")

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        original = self.original_max_position_embeddings
        static_scale = max_position_embeddings / original if self.finetuned else 1.0
        s = seq_len / original if seq_len is not None and seq_len > max_position_embeddings else static_scale
        ramp = yarn_ramp(head_dim, theta, original, self.beta_fast, self.beta_slow, True)
        return by_parts(plain(theta, head_dim), s, ramp), mscale(s)


@dataclasses.dataclass(frozen=True)
class Llama3:
    """Llama 3.1's frequency-banded scaling (transformers `_compute_llama3_parameters`)."""

    factor: float
    original_max_position_embeddings: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    rope_type: ClassVar[str] = "llama3"

    def __post_init__(self):
        _factor(self)
        _original(self)
        _positive(self, "low_freq_factor", "high_freq_factor")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("rope_scaling.high_freq_factor: expected a value > low_freq_factor "
                             f"({self.low_freq_factor}), got {self.high_freq_factor}")

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        base = plain(theta, head_dim)
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / base
        inv = np.where(wavelen > low_wavelen, base / self.factor, base)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * inv / self.factor + smooth * inv
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, inv), 1.0


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
            set_field(self, name, tuple(number(f"rope_scaling.{name}", v, gt=0.0) for v in values))
        _original(self)
        if self.factor is not None:
            _factor(self)
        _positive(self, "attention_factor")

    def frequencies(self, head_dim, theta, max_position_embeddings, seq_len) -> tuple[np.ndarray, float]:
        original = self.original_max_position_embeddings
        factor = self.factor if self.factor is not None else max_position_embeddings / original
        if self.attention_factor is not None:
            attention = self.attention_factor
        else:
            attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
        per_freq = np.asarray(self.long_factor if seq_len and seq_len > original else self.short_factor)
        return plain(theta, head_dim) / per_freq, attention


Scaling = Default | Linear | NTK | Dynamic | Yarn | DynamicYarn | Llama3 | LongRope
SCALINGS: dict[str, type] = {c.rope_type: c for c in (Default, Linear, NTK, Dynamic, Yarn, DynamicYarn,
                                                       Llama3, LongRope)}

# ----------------------------------------------------------------------------- transformers' dicts

# Keys that belong to the whole rope dict rather than to one method (transformers 5 puts rope_theta
# inside rope_parameters); `dynamic_yarn` accepts `factor` as the original configs wrote it and ignores it
# there, because its scale comes from the lengths.
_SHARED_KEYS = {"rope_type", "type", "rope_theta"}
_IGNORED_KEYS = {DynamicYarn: {"factor"}}


def rope_class(d: dict[str, Any]) -> type:
    """The scaling class a rope_scaling dict names (key `rope_type` or `type`; none: plain RoPE)."""
    name = d.get("rope_type", d.get("type", "default"))
    name = "dynamic_yarn" if name == "dynamic-yarn" else name  # spelling of the original YaRN code
    if name not in SCALINGS:
        raise ValueError(f"rope_scaling.rope_type: unknown rope type {name!r}; expected one of {sorted(SCALINGS)}")
    return SCALINGS[name]


def known_keys(cls: type) -> set[str]:
    """The keys a rope_scaling dict of `cls` may hold."""
    keys = {f.name for f in dataclasses.fields(cls)} | _SHARED_KEYS | _IGNORED_KEYS.get(cls, set())
    return keys | {"factor"} if cls is NTK else keys  # NTK's alpha, spelt factor by transformers


def unknown_keys(d: dict[str, Any]) -> list[str]:
    """The keys of a rope_scaling dict that its rope type does not use."""
    return sorted(set(d) - known_keys(rope_class(d)))


def scaling_from_dict(d: dict[str, Any] | None, max_position_embeddings: int) -> Scaling:
    """Reads a transformers-style `rope_scaling` / `rope_parameters` dict (key `rope_type` or `type`).

    Defaults follow transformers: yarn/llama3/longrope take original_max_position_embeddings =
    max_position_embeddings when absent, and yarn's factor = max / original when absent.
    """
    if not d:
        return Default()
    if not isinstance(d, dict):
        raise ValueError(f"rope_scaling: expected a dict, got {d!r}")
    cls = rope_class(d)
    name = cls.rope_type
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
    if cls is NTK and "alpha" not in kwargs and "factor" in d:
        kwargs["alpha"] = d["factor"]
    unknown = unknown_keys(d)
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
