"""Fine-tuning SmolLM2-135M-Instruct (trained at 8192 tokens) by s = 4 to 32768 tokens with one method, on
text that is not the evaluation set (the Linux kernel's documentation and Shakespeare's plays, built by
the real-model benchmark, yarn_jax/bench/real_model.py), every method with the same budget: 120 steps x 32768 tokens
(3.9M), the paper's recipe otherwise (lr 2e-5 after 20 warm-up steps, AdamW (0.9, 0.95), no weight decay).
A checkpoint every 20 steps gives the steps-to-target curve.

    python -m yarn_jax.train --config configs/real_model.py:yarn --config.init_from=OUT/base \
        --config.data.sources="('FINETUNE.jsonl',)" --workdir DIR

(the method after the colon: yarn, pi or ntk)
"""

from yarn_jax import repro
from yarn_jax.run_config import base

ORIGINAL, FACTOR = 8192, 4


def get_config(method: str = "yarn"):
    c = base()
    c.init_from = ""  # the converted model (convert from-hf)
    c.model.update(dict(remat="none"))
    c.rope.update(repro.finetune_rope(method, original=ORIGINAL, factor=FACTOR))
    c.data.update(dict(sources=(), format="jsonl", field="text", packing="concat", seq_len=ORIGINAL * FACTOR,
                       batch_size=1))
    c.optim.update(dict(lr=2e-5, warmup_steps=20, schedule="constant"))
    c.train.update(dict(steps=120, loss_chunk=4096, save_every=20, keep=1000))
    c.mesh.update(dict(data=-1, fsdp=1, seq=1, tensor=1))
    return c
