"""`Execution`: how a model runs (dtypes, rematerialisation, attention kernel, ring layout, layer unrolling),
as opposed to what it is (`config.LlamaConfig`'s architecture, which checkpoints and config.json carry).

The run config's `model.dtype`, `model.remat`, ... fill it (`run_config.model_config`); a checkpoint or a
Hugging Face directory loads with the execution the caller asks for.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from yarn_jax.model.validate import member, number, set_field


def divisor_at_most(n: int, bound: int) -> int:
    """The largest divisor of `n` that is at most `bound`: `n` cut into as few whole chunks as the bound
    allows (1,000 tokens under a bound of 1,024 are one chunk of 1,000, not 125 of gcd(1000, 1024) = 8)."""
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


class Remat(enum.Enum):
    """What each scanned layer keeps for the backward pass (the rest is recomputed)."""

    NONE = "none"  # keep everything: fastest, most memory
    FULL = "full"  # keep only the layer input
    DOTS = "dots"  # keep matmul outputs without batch dims (projections), recompute attention & elementwise
    ATTENTION = "attention"  # keep q, k, v, the attention output (and cuDNN's softmax statistics); recompute the MLP
    OFFLOAD = "offload"  # as FULL, the layer input kept in the host's memory instead (pinned_host): copied out in
    # the forward, back before the layer's backward; device memory less by [L, B, T, D] in the compute dtype


class AttentionImpl(enum.Enum):
    """Per-device attention kernel; AUTO picks the platform's fastest at call time."""

    AUTO = "auto"
    REFERENCE = "reference"
    CUDNN = "cudnn"
    SPLASH = "splash"


class RingLayout(enum.Enum):
    """How ring attention balances causal work over the 'seq' axis (see attention/ring.py)."""

    ZIGZAG = "zigzag"
    STRIPED = "striped"


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(field: str, value: Any) -> np.dtype:
    """A dtype name (or dtype) among DTYPES, as a numpy dtype."""
    name = np.dtype(value).name if not isinstance(value, str) else value
    if name not in DTYPES:
        raise ValueError(f"{field}: expected one of {sorted(DTYPES)}, got {value!r}")
    return np.dtype(DTYPES[name])


@dataclasses.dataclass(frozen=True)
class Execution:
    dtype: Any = jnp.bfloat16  # activations and matmul inputs
    param_dtype: Any = jnp.float32
    remat: Remat = Remat.NONE
    attention: AttentionImpl = AttentionImpl.AUTO
    ring_layout: RingLayout = RingLayout.ZIGZAG
    scan_unroll: int = 1  # layers per iteration of the scan over layers (num_layers: no loop, only with remat none)
    fp8: bool = False  # the layers' projections as FP8 GEMMs (projection.fp8_dot; for Hopper GPUs), off by default

    def __post_init__(self):
        set_ = functools.partial(set_field, self)
        set_("dtype", dtype("dtype", self.dtype))
        set_("param_dtype", dtype("param_dtype", self.param_dtype))
        set_("remat", member("remat", Remat, self.remat))
        set_("attention", member("attention", AttentionImpl, self.attention))
        set_("ring_layout", member("ring_layout", RingLayout, self.ring_layout))
        set_("scan_unroll", number("scan_unroll", self.scan_unroll, integer=True, gt=0))
        if not isinstance(self.fp8, bool | np.bool_):
            raise ValueError(f"fp8: expected true or false, got {self.fp8!r}")
        set_("fp8", bool(self.fp8))

    def replace(self, **changes: Any) -> Execution:
        return dataclasses.replace(self, **changes)
