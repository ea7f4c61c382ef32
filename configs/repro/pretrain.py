"""Reproduction, stage 1: pretrain a 32.5M-parameter LLaMA (8 layers, d 512, 8 heads, 2 kv heads (GQA),
head dim 64, F 1536, V 8192, RoPE theta 10000, untied) at 512 tokens on the training split of the Python
standard library's source (`yarn_jax.repro.corpus`) and 8000 synthetic passkey documents
(`yarn_jax.repro.passkey_documents`), packed whole ("fit"): 1500 steps x 64 x 512 = 49.2M token slots.

    python -m yarn_jax.bench reproduce --out /tmp/repro    (runs every stage; see yarn_jax/bench/reproduce.py)

Standalone: python -m yarn_jax.train --config configs/repro/pretrain.py --workdir DIR
(the tokenizer is trained on the training split once and cached).
"""

from yarn_jax import repro
from yarn_jax.run_config import base


def get_config():
    c = base()
    c.model.update(dict(preset="tiny", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8,
                        num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=10000.0,
                        tie_word_embeddings=False, remat="none"))
    c.data.update(dict(sources=tuple(repro.corpus()[0]), tokenizer_vocab=8192, packing="fit", seq_len=512,
                       batch_size=64))
    c.optim.update(dict(lr=1e-3, warmup_steps=100, schedule="cosine", weight_decay=0.1))
    c.train.update(dict(steps=1500, loss_chunk=512, save_every=500, keep=1))
    c.mesh.update(dict(data=-1, fsdp=1, seq=1, tensor=1))
    return c
