"""Frozen float64 reference of the original YaRN code's formulas (jquesnelle/yarn, scaled_rope), written
by us from the paper (section 3) and those formulas, loop by loop, for the methods transformers lacks
(static NTK-aware, dynamic YaRN) and for the NTK-by-parts ramp. Deliberately naive: one dimension at a time.
"""

import math


def plain(dim: int, base: float) -> list[float]:
    return [base ** (-(2 * i) / dim) for i in range(dim // 2)]


def ntk(dim: int, base: float, alpha: float) -> list[float]:
    """NTK-aware: b' = b * alpha^(d / (d - 2))."""
    return plain(dim, base * alpha ** (dim / (dim - 2)))


def correction_range(dim: int, base: float, orig: int, beta_fast: float, beta_slow: float,
                     truncate: bool = True) -> tuple[float, float]:
    def dim_for(rotations):  # the dimension index that completes `rotations` turns over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def ramp(dim: int, base: float, orig: int, beta_fast: float = 32, beta_slow: float = 1,
         truncate: bool = True) -> list[float]:
    low, high = correction_range(dim, base, orig, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001
    out = []
    for i in range(dim // 2):
        x = (i - low) / (high - low)
        out.append(min(max(x, 0.0), 1.0))
    return out


def yarn(dim: int, base: float, orig: int, scale: float, beta_fast: float = 32, beta_slow: float = 1,
         truncate: bool = True) -> tuple[list[float], float]:
    """(inv_freq, mscale): interpolate where the ramp is 1, keep where it is 0; mscale = 0.1 ln s + 1."""
    r = ramp(dim, base, orig, beta_fast, beta_slow, truncate)
    inv = []
    for theta, g in zip(plain(dim, base), r, strict=False):
        inv.append((theta / scale) * g + theta * (1 - g))
    mscale = 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0
    return inv, mscale


def dynamic_yarn(dim: int, base: float, orig: int, max_pos: int, seq_len: int,
                 finetuned: bool) -> tuple[list[float], float]:
    """LlamaDynamicYaRNScaledRotaryEmbedding: rescale once the sequence outgrows max_position_embeddings."""
    if seq_len > max_pos:
        return yarn(dim, base, orig, seq_len / orig)
    if finetuned:
        return yarn(dim, base, orig, max_pos / orig)
    return plain(dim, base), 1.0
