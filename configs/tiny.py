"""The embedded default: a tiny LLaMA with YaRN (s = 4, 128 -> 512 tokens) trained on the Python standard
library's own source files, with a SentencePiece model trained once and cached (~/.cache/yarn_jax).
No download; a few minutes on a 2-core CPU.

    python -m yarn_jax.train --config configs/tiny.py --workdir /tmp/yarn_tiny

Mesh: every local device on the fsdp axis (one CPU: a 1x1x1x1 mesh).
It pretrains from random weights, hence lr 1e-3 and a cosine decay (the paper's 2e-5 is for fine-tuning).
"""

from yarn_jax.run_config import base


def get_config():
    c = base()
    c.model.update(dict(preset="tiny", vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=128, dtype="float32",
                        remat="none"))
    c.rope.update(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                       max_position_embeddings=512))
    c.data.update(dict(tokenizer_vocab=1024, seq_len=512, batch_size=8, skip_docs=16))
    c.optim.update(dict(lr=1e-3, schedule="cosine"))
    c.train.update(dict(steps=150, loss_chunk=256, save_every=50))
    return c
