"""Reproduction, stage 2: extend the pretrained model by s = 8 (512 -> 4096 tokens) with one method,
all methods with the same budget: 200 steps x 8 x 4096 = 6.6M tokens (13% of pretraining), lr 1e-4
constant after 20 warm-up steps, AdamW (0.9, 0.95), no weight decay (the paper's recipe, lr scaled to
the small model). A checkpoint every 25 steps gives the steps-to-target curve.

    python -m yarn_jax.train --config configs/repro/finetune.py:yarn --config.init_from=PRETRAIN/checkpoints \
        --workdir DIR        (METHOD: pi | ntk | yarn | parts | pi_t)
"""

from yarn_jax import repro
from yarn_jax.run_config import base


def get_config(method: str = "yarn"):
    c = base()
    c.init_from = ""  # the pretraining run's checkpoints directory
    c.model.update(dict(remat="none"))
    c.rope.update(repro.finetune_rope(method, original=512, factor=8))
    c.data.update(dict(sources=tuple(repro.corpus()[0]), tokenizer_vocab=8192, packing="fit", seq_len=4096,
                       batch_size=8))
    c.optim.update(dict(lr=1e-4, warmup_steps=20, schedule="constant"))
    c.train.update(dict(steps=200, loss_chunk=2048, save_every=25, keep=1000))
    c.mesh.update(dict(data=-1, fsdp=1, seq=1, tensor=1))
    return c
