"""The paper's s = 32 run: from the s = 16 checkpoint, 200 more steps at 128k (same recipe otherwise).

    python -m yarn_jax.train --config configs/v4_128k.py --workdir gs://BUCKET/yarn_128k \
        --config.init_from=gs://BUCKET/yarn_64k/checkpoints/400 ...

Mesh (TPU v4-128, 64 chips): fsdp 8 x seq 8 (ring over 8 chips, 16k tokens each); gradient
accumulation 8 (8 sequences per micro-batch).

AOT status: `python -m yarn_jax.aot --config <this file> --topology v4-128` does not yet report a fit
(see README, "Not built yet / known limits"); the mesh is the intended one, not a verified one.
"""

from yarn_jax.run_config import base


def get_config():
    c = base()
    c.rope.update(dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096,
                       max_position_embeddings=131072))
    c.data.update(dict(seq_len=131072, batch_size=64))
    c.train.update(dict(steps=200, grad_accum=8))
    c.mesh.update(dict(data=1, fsdp=8, seq=8, tensor=1))
    return c
