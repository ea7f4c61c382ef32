"""The paper's s = 16 run: Llama 2 7B, YaRN from 4k to 64k, 400 steps of 64 x 64k tokens, lr 2e-5,
no weight decay, 20 warm-up steps, AdamW(0.9, 0.95), PG19 chunked into 64k pieces with BOS/EOS bookends.

    python -m yarn_jax.convert from-hf llama-2-7b-hf gs://BUCKET/llama2_7b --rope-type yarn --factor 16 \
        --original-max-position-embeddings 4096 --max-position-embeddings 65536
    python -m yarn_jax.train --config configs/v4_64k.py --workdir gs://BUCKET/yarn_64k \
        --config.init_from=gs://BUCKET/llama2_7b --config.data.sources="('pg19/train/*.txt',)" \
        --config.data.tokenizer=llama-2-7b-hf/tokenizer.model

Mesh (TPU v4-128, 64 chips): fsdp 16 x seq 4 (ring attention over 4 chips, 16k tokens each);
gradient accumulation 4 (16 sequences per micro-batch, one per fsdp group).

AOT status: `python -m yarn_jax.aot --config <this file> --topology v4-128` does not yet report a fit
(see README, "Not built yet / known limits"); the mesh is the intended one, not a verified one.
"""

from yarn_jax.run_config import base


def get_config():
    c = base()
    c.rope.update(dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=4096,
                       max_position_embeddings=65536))
    c.data.update(dict(seq_len=65536, batch_size=64))
    c.train.update(dict(steps=400, grad_accum=4))
    c.mesh.update(dict(data=1, fsdp=16, seq=4, tensor=1))
    return c
