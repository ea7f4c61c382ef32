"""Tiny random transformers models of the LLaMA family (Llama, Mistral, Qwen2, Qwen3), built locally (no
hub), and their weights in our layout."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from yarn_jax.io.hf_layout import params_from_hf
from yarn_jax.model.config import LlamaConfig

FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}


def hf_config(*, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, hidden: int | None = None,
              tied: bool = False, rope_scaling: dict | None = None, max_pos: int = 64, layers: int = 2,
              vocab: int = 128, family: str = "llama", **extra) -> transformers.PretrainedConfig:
    """`extra`: the family's own keys (attention_bias, sliding_window, use_sliding_window, ...)."""
    if family == "mistral":
        extra.setdefault("sliding_window", None)
    return FAMILIES[family][0](
        vocab_size=vocab, hidden_size=hidden or heads * head_dim, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=max_pos,
        rope_theta=10000.0, rope_scaling=rope_scaling, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        attn_implementation="eager", **extra)


def hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = FAMILIES[config.model_type][1](config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a missing one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model


def ours(model: transformers.PreTrainedModel) -> tuple[LlamaConfig, dict]:
    cfg = LlamaConfig.from_hf(model.config.to_dict(), dtype="float32")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, params_from_hf(cfg, state.__getitem__)


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens), **kw).logits.numpy()
