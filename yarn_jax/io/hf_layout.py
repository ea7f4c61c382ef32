"""The one place that knows how our parameter tree maps onto the Hugging Face tensors of the LLaMA family
(LlamaForCausalLM, and the biases and per-head q/k norms of Mistral / Qwen2 / Qwen3: same names).

Ours keep natural axes (q [D, N, H], o [N, H, D], mlp [D, F] / [F, D]); HF stores torch Linear weights
[out, in]. Because both use the rotate-half RoPE layout, the mapping is transpose + reshape only:
no q/k permutation, no folded 1/sqrt(H). Layer tensors are stacked on a leading L axis on our side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from yarn_jax.model.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One parameter: its path in our tree, its HF name ({i} = layer), and its shapes on both sides."""

    path: tuple[str, ...]
    hf_name: str
    shape: tuple[int, ...]  # ours, per layer for layer tensors
    hf_shape: tuple[int, ...]
    transpose: bool  # HF [out, in] vs our [in, out]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.transpose else w).reshape(self.shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.transpose:
            return w.reshape(self.hf_shape[::-1]).T
        return w.reshape(self.hf_shape)


def layout(cfg: LlamaConfig) -> list[Tensor]:
    d, f, n, k, h, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.vocab_size)
    layer = "model.layers.{i}."
    tensors = [
        Tensor(("embedding",), "model.embed_tokens.weight", (v, d), (v, d), False),
        Tensor(("final_norm", "scale"), "model.norm.weight", (d,), (d,), False),
        Tensor(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", (d,), (d,), False),
        Tensor(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (d,), (d,), False),
        Tensor(("layers", "attn", "q"), layer + "self_attn.q_proj.weight", (d, n, h), (n * h, d), True),
        Tensor(("layers", "attn", "k"), layer + "self_attn.k_proj.weight", (d, k, h), (k * h, d), True),
        Tensor(("layers", "attn", "v"), layer + "self_attn.v_proj.weight", (d, k, h), (k * h, d), True),
        Tensor(("layers", "attn", "o"), layer + "self_attn.o_proj.weight", (n, h, d), (d, n * h), True),
        Tensor(("layers", "mlp", "gate"), layer + "mlp.gate_proj.weight", (d, f), (f, d), True),
        Tensor(("layers", "mlp", "up"), layer + "mlp.up_proj.weight", (d, f), (f, d), True),
        Tensor(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", (f, d), (d, f), True),
    ]
    attn = layer + "self_attn."
    if cfg.qkv_bias:
        tensors += [Tensor(("layers", "attn", "q_bias"), attn + "q_proj.bias", (n, h), (n * h,), False),
                    Tensor(("layers", "attn", "k_bias"), attn + "k_proj.bias", (k, h), (k * h,), False),
                    Tensor(("layers", "attn", "v_bias"), attn + "v_proj.bias", (k, h), (k * h,), False)]
    if cfg.o_bias:
        tensors.append(Tensor(("layers", "attn", "o_bias"), attn + "o_proj.bias", (d,), (d,), False))
    if cfg.qk_norm:
        tensors += [Tensor(("layers", "attn", "q_norm", "scale"), attn + "q_norm.weight", (h,), (h,), False),
                    Tensor(("layers", "attn", "k_norm", "scale"), attn + "k_norm.weight", (h,), (h,), False)]
    if not cfg.tie_word_embeddings:
        tensors.append(Tensor(("lm_head",), "lm_head.weight", (d, v), (v, d), True))
    return tensors


def hf_names(cfg: LlamaConfig) -> list[str]:
    """Every tensor name the family's *ForCausalLM state dict of this config has."""
    return [name for t in layout(cfg) for name in names_of(t, cfg)]


def names_of(t: Tensor, cfg: LlamaConfig) -> list[str]:
    return [t.hf_name.format(i=i) for i in range(cfg.num_layers)] if t.per_layer else [t.hf_name]


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def check_hf_shape(t: Tensor, name: str, w: Any) -> None:
    if tuple(w.shape) != t.hf_shape:
        raise ValueError(f"tensor {name}: expected shape {t.hf_shape} for this config, got {tuple(w.shape)}")


def params_from_hf(cfg: LlamaConfig, get: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """Our parameter tree from `get(hf_name) -> array` (numpy, any dtype kept as is)."""
    params: dict[str, Any] = {}
    for t in layout(cfg):
        parts = []
        for name in names_of(t, cfg):
            w = get(name)
            check_hf_shape(t, name, w)
            parts.append(t.to_ours(np.asarray(w)))
        set_path(params, t.path, np.stack(parts) if t.per_layer else parts[0])
    return params


def params_to_hf(cfg: LlamaConfig, params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, array) one tensor at a time, in layout order; arrays are materialised lazily per tensor."""
    for t in layout(cfg):
        w = get_path(params, t.path)
        if t.per_layer:
            for i, name in enumerate(names_of(t, cfg)):
                yield name, t.to_hf(np.asarray(w[i]))
        else:
            yield t.hf_name, t.to_hf(np.asarray(w))
