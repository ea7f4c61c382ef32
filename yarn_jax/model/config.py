"""`LlamaConfig`: the model's architecture (shape, RoPE scaling, family switches) and the `Execution` it
runs with, validated once at the boundary.

One model for the LLaMA family: Mistral, Qwen2 / Qwen2.5 and Qwen3 are LLaMA with a few switches
(`Family` says which `transformers` class a config reads from and writes back to):

    family   q/k/v bias      o bias          q/k RMSNorm per head   sliding window
    llama    attention_bias  attention_bias  no                     no
    mistral  no              no              no                     sliding_window (every layer)
    qwen2    yes             no              no                     use_sliding_window (every layer)
    qwen3    attention_bias  attention_bias  yes                    use_sliding_window (every layer)

Read and written in Hugging Face's `config.json` keys: `from_hf` accepts the old `rope_scaling` (with
`type` or `rope_type`) and transformers 5's `rope_parameters`; `to_hf` writes `rope_scaling` plus a
top-level `rope_theta`, which every transformers version reads.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from typing import Any

import numpy as np

from yarn_jax.model import rope as rope_lib
from yarn_jax.model import scaling as scaling_lib
from yarn_jax.model.execution import Execution, Remat
from yarn_jax.model.validate import member, number, set_field


class Family(enum.Enum):
    """The transformers model a config is read from and exported as (its `model_type`)."""

    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"

    @property
    def architecture(self) -> str:
        return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.value]


_WINDOWED = (Family.MISTRAL, Family.QWEN2, Family.QWEN3)  # families whose transformers class has a window


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A LLaMA-family decoder. Dimension letters (see yarn_jax/__init__.py): V, D, F, L, N, K, H."""

    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K (GQA when K < N)
    head_dim: int  # H
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: scaling_lib.Scaling = scaling_lib.Default()
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    family: Family = Family.LLAMA
    qkv_bias: bool = False  # q, k, v projections with a bias (Qwen2; attention_bias of Llama / Qwen3)
    o_bias: bool = False  # the output projection with a bias (attention_bias of Llama / Qwen3)
    qk_norm: bool = False  # RMSNorm over H of each head of q and k, before RoPE (Qwen3)
    sliding_window: int | None = None  # a query sees keys at most this many tokens back, itself included
    execution: Execution = Execution()  # how it runs: not part of the checkpointed architecture

    def __post_init__(self):
        set_ = functools.partial(set_field, self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            set_(name, number(name, getattr(self, name), integer=True, gt=0))
        for name in ("bos_token_id", "eos_token_id"):
            set_(name, number(name, getattr(self, name), integer=True, ge=0))
        set_("rms_norm_eps", number("rms_norm_eps", self.rms_norm_eps, gt=0.0))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads: expected a divisor of num_attention_heads ({self.num_heads}), "
                             f"got {self.num_kv_heads}")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        set_("family", member("model_type", Family, self.family))
        if self.sliding_window is not None:
            set_("sliding_window", number("sliding_window", self.sliding_window, integer=True, gt=0))
        self._check_family()
        if not isinstance(self.execution, Execution):
            raise ValueError(f"execution: expected an Execution, got {type(self.execution).__name__}")
        x = self.execution
        if x.remat is not Remat.NONE and x.scan_unroll > 1 and x.scan_unroll >= self.num_layers:
            # straight-line code leaves the compiler free to recompute early: measured, the compiled step
            # kept every activation (CPU memory analysis; out of memory on the H200 at 131072 tokens); with the
            # recomputation behind a barrier a v6e compile still kept 2x scanned 'full' (NOTES.md, 2026-12-07)
            raise ValueError(f"scan_unroll: {x.scan_unroll} unrolls all {self.num_layers} layers, which keeps every "
                             f"activation whatever remat says ({x.remat.value!r}); use remat 'none' or a smaller "
                             "scan_unroll")
        _ = self.rope  # validates head_dim parity, theta and the scaling against head_dim

    def _check_family(self) -> None:
        """What the family's transformers class can hold (an export must load as the same model)."""
        f = self.family
        if self.qk_norm != (f is Family.QWEN3):
            raise ValueError(f"qk_norm: {f.value} models {'always' if f is Family.QWEN3 else 'never'} normalise "
                             f"q and k per head, got {self.qk_norm}")
        if f is Family.QWEN2 and (not self.qkv_bias or self.o_bias):
            raise ValueError("attention_bias: qwen2 has biases on q, k, v and none on o (transformers' Qwen2), got "
                             f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        if f is Family.MISTRAL and (self.qkv_bias or self.o_bias):
            raise ValueError("attention_bias: mistral has no attention biases")
        if f in (Family.LLAMA, Family.QWEN3) and self.qkv_bias != self.o_bias:
            raise ValueError(f"attention_bias: {f.value} has one switch for the q, k, v and o biases, got "
                             f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
        if self.sliding_window is not None and f not in _WINDOWED:
            raise ValueError(f"sliding_window: {f.value} has no sliding window (mistral, qwen2 and qwen3 do), got "
                             f"{self.sliding_window}")

    @functools.cached_property
    def rope(self) -> rope_lib.Rope:
        """The RoPE of this model (built and validated once per config)."""
        return rope_lib.Rope(self.head_dim, self.rope_theta, self.max_position_embeddings, self.rope_scaling)

    def replace(self, **changes: Any) -> LlamaConfig:
        """Architecture fields changed (`with_execution` changes how it runs)."""
        return dataclasses.replace(self, **changes)

    def with_execution(self, **changes: Any) -> LlamaConfig:
        """The same architecture run differently: `changes` are `Execution` fields (dtype, remat, ...)."""
        return dataclasses.replace(self, execution=self.execution.replace(**changes))

    def num_params(self) -> int:
        """Parameter count, computed from the shapes (equal to `init_params` leaves' total size)."""
        d, f, n, k, h = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        layer = d * h * (2 * n + 2 * k) + 3 * d * f + 2 * d
        layer += (n + 2 * k) * h * self.qkv_bias + d * self.o_bias + 2 * h * self.qk_norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * layer + self.vocab_size * d + head + d

    # ------------------------------------------------------------------------- Hugging Face

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **execution: Any) -> LlamaConfig:
        """From a transformers `config.json` dict, run with `Execution(**execution)` (dtype, remat, ...)."""
        if not isinstance(hf, dict):
            raise ValueError(f"config: expected a dict of config.json keys, got {type(hf).__name__}")
        family = member("model_type", Family, hf.get("model_type", "llama"))
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias: MLP biases are not part of the LLaMA family supported here, got true")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: expected 'silu', got {hf['hidden_act']!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"{key}: missing from config")
        hidden = number("hidden_size", hf["hidden_size"], integer=True, gt=0)
        heads = number("num_attention_heads", hf["num_attention_heads"], integer=True, gt=0)
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"hidden_size: expected a multiple of num_attention_heads ({heads}) when head_dim "
                                 f"is not given, got {hidden}")
            head_dim = hidden // heads
        rope_dict = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        theta = rope_dict.get("rope_theta", hf.get("rope_theta", 10000.0))
        max_pos = number("max_position_embeddings", hf.get("max_position_embeddings", 4096), integer=True, gt=0)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=theta,
            max_position_embeddings=max_pos,
            rope_scaling=scaling_lib.scaling_from_dict(rope_dict, max_pos),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
            eos_token_id=_first(hf.get("eos_token_id"), 2),
            family=family,
            **_family_fields(family, hf),
            execution=Execution(**execution),
        )

    def to_hf(self) -> dict[str, Any]:
        """config.json keys for the family's transformers class (YaRN switched on via rope_scaling)."""
        hf = {
            "architectures": [self.family.architecture],
            "model_type": self.family.value,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_scaling": scaling_lib.scaling_to_dict(self.rope_scaling),
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": np.dtype(self.execution.param_dtype).name,
        }
        if self.family in (Family.LLAMA, Family.QWEN3):
            hf.update(attention_bias=self.qkv_bias)
        if self.family is Family.LLAMA:
            hf.update(mlp_bias=False)
        elif self.family is Family.MISTRAL:
            hf.update(sliding_window=self.sliding_window)
        else:  # the window on every layer: max_window_layers (the first layers without it) 0
            windowed = self.sliding_window is not None
            hf.update(use_sliding_window=windowed, sliding_window=self.sliding_window,
                      max_window_layers=0 if windowed else self.num_layers)
        return hf

    def to_json(self) -> str:
        """Architecture only (the checkpoint metadata); execution fields come from the run's config."""
        return json.dumps(self.to_hf(), indent=2, sort_keys=True)


def _flag(hf: dict[str, Any], key: str) -> bool:
    value = hf.get(key) or False
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value


def _family_fields(family: Family, hf: dict[str, Any]) -> dict[str, Any]:
    """qkv_bias, o_bias, qk_norm and sliding_window from the family's own config.json keys."""
    bias = _flag(hf, "attention_bias") if family in (Family.LLAMA, Family.QWEN3) else False
    out = dict(qkv_bias=bias or family is Family.QWEN2, o_bias=bias, qk_norm=family is Family.QWEN3,
               sliding_window=None)
    if family is Family.MISTRAL:
        out["sliding_window"] = hf.get("sliding_window")
    elif family in (Family.QWEN2, Family.QWEN3) and _flag(hf, "use_sliding_window"):
        out["sliding_window"] = hf.get("sliding_window")
        layers = number("num_hidden_layers", hf["num_hidden_layers"], integer=True, gt=0)
        first = number("max_window_layers", hf.get("max_window_layers", 0), integer=True, ge=0)
        types = hf.get("layer_types") or ["full_attention" if i < first else "sliding_attention" for i in range(layers)]
        if not isinstance(types, list) or set(types) - {"full_attention", "sliding_attention"}:
            raise ValueError(f"layer_types: expected a list of 'full_attention' / 'sliding_attention', got {types!r}")
        if len(set(types)) > 1:
            raise ValueError(f"layer_types: a sliding window on some layers only ({types.count('sliding_attention')} "
                             f"of {len(types)}) is not supported; the window must cover every layer or none")
        if types[0] == "full_attention":
            out["sliding_window"] = None
    return out


def _first(value: Any, default: int) -> int:
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


# ----------------------------------------------------------------------------- presets

def tiny(**kw: Any) -> LlamaConfig:
    """A few-kilobyte GQA model for tests."""
    return LlamaConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16, max_position_embeddings=128), **kw})


def llama2_7b(**kw: Any) -> LlamaConfig:
    return LlamaConfig(**{**dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                 num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096), **kw})


def llama2_13b(**kw: Any) -> LlamaConfig:
    return LlamaConfig(**{**dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                                 num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096), **kw})


def llama2_70b(**kw: Any) -> LlamaConfig:
    return LlamaConfig(**{**dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                 num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=4096), **kw})


def llama3_8b(**kw: Any) -> LlamaConfig:
    return LlamaConfig(**{**dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                 num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                 max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001), **kw})


PRESETS = {f.__name__: f for f in (tiny, llama2_7b, llama2_13b, llama2_70b, llama3_8b)}


def with_rope(hf: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config dict with RoPE overrides applied, by the one rule of train (`rope`), convert
    (`--rope-type`, `--factor`, ...) and eval (`--rope`): an override naming `rope_type` replaces the
    scaling, other keys update it; `max_position_embeddings` (the extended length) and `rope_theta` set
    the top-level keys. A new scaling's original_max_position_embeddings defaults to the model's trained
    length (the current scaling's, else its max_position_embeddings), and YaRN's factor to the extended
    over the original length. Refused, naming the key: a key the rope type does not use, a YaRN that
    would extend nothing, an extended length below the trained one."""
    hf = dict(hf)
    rope = {k: v for k, v in rope.items() if v is not None}
    current = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    trained = current.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
    for key in ("max_position_embeddings", "rope_theta"):
        if key in rope:
            hf[key] = rope.pop(key)
    if not rope:
        return hf
    hf.pop("rope_scaling", None)
    hf.pop("rope_parameters", None)
    current.pop("rope_theta", None)
    if "rope_type" in rope:
        current = {}
    merged = {**current, **rope}
    cls = scaling_lib.rope_class(merged)
    unknown = [k for k in scaling_lib.unknown_keys(merged) if k in rope]
    if unknown:
        raise ValueError(f"rope.{unknown[0]}: not a key of rope type {cls.rope_type!r}; expected one of "
                         f"{sorted(scaling_lib.known_keys(cls) - {'type', 'rope_theta'})}")
    if "original_max_position_embeddings" in scaling_lib.known_keys(cls):
        original = merged.setdefault("original_max_position_embeddings", trained)
        extended = hf.get("max_position_embeddings", 4096)
        if isinstance(original, int) and isinstance(extended, int) and extended < original:
            raise ValueError(f"max_position_embeddings: the extended length {extended} is below "
                             f"original_max_position_embeddings {original}, the length the model was trained at")
        if cls is scaling_lib.Yarn and "factor" not in merged:
            if not (isinstance(original, int) and isinstance(extended, int) and extended > original):
                raise ValueError(f"rope.factor: required for rope type 'yarn' (or an extended "
                                 f"max_position_embeddings above original_max_position_embeddings {original} "
                                 "to derive it from)")
            merged["factor"] = extended / original
    hf["rope_scaling"] = merged
    return hf
