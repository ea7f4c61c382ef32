"""One GPU: a TinyLlama-1.1B-shaped model (22 layers, d 2048, 32 heads, 4 kv heads, F 5632, V 32000)
with YaRN s = 4 from 2k, 8k tokens per step, cuDNN attention, bf16 compute, float32 master weights,
layers unrolled without remat (fastest up to 65536 tokens on one H200; 131072 needs
`--config.model.scan_unroll=1 --config.model.remat=attention`, 262144 `model.remat=full`).

    python -m yarn_jax.train --config configs/h200_1b.py --workdir /tmp/yarn_h200

Mesh: one device (data = fsdp = seq = tensor = 1).
"""

from yarn_jax.run_config import base


def get_config():
    c = base()
    c.model.update(dict(preset="llama2_7b", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                        num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=2048,
                        remat="none", scan_unroll=22))
    c.rope.update(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048,
                       max_position_embeddings=8192))
    c.data.update(dict(seq_len=8192, batch_size=1))
    c.train.update(dict(steps=100))
    c.mesh.update(dict(data=1, fsdp=1, seq=1, tensor=1))
    return c
