"""The embedded default: a tiny LLaMA with YaRN (s = 4, 128 -> 512 tokens) trained on the Python standard
library's own source files, with a SentencePiece model trained once and cached (~/.cache/yarn_jax).
No download; a few minutes on a 2-core CPU.

    python -m yarn_jax.train --config configs/tiny.py --workdir /tmp/yarn_tiny

Mesh: every local device on the fsdp axis (one CPU: a 1x1x1x1 mesh).
It pretrains from random weights, hence lr 1e-3 (the paper's 2e-5 is for fine-tuning a trained model).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a `convert from-hf` checkpoint; empty: random init from `model`
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny", vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position_embeddings=512,
        dtype="float32", param_dtype="float32", remat="none", attention="auto", ring_layout="zigzag"))
    c.rope = ml_collections.ConfigDict(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128))
    c.data = ml_collections.ConfigDict(dict(
        sources=(),  # empty: the Python standard library's *.py files
        format="text", field="text", tokenizer="", tokenizer_vocab=1024, cache_dir="~/.cache/yarn_jax",
        seq_len=512, batch_size=8, positions="chunk", seed=0, shuffle=True, skip_docs=16))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=20, b1=0.9, b2=0.95, eps=1e-8,
                                             weight_decay=0.0, clip=1.0, schedule="cosine"))
    c.train = ml_collections.ConfigDict(dict(steps=150, grad_accum=1, loss_chunk=256, save_every=50, keep=3,
                                             inject_nan_at=-1))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, seq=1, tensor=1))
    return c
