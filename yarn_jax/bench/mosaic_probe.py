"""Is jax's Mosaic GPU flash attention (FlashAttention-3 style, `attention_mgpu`) a faster kernel for our
step than cuDNN's? Times both at the step's attention shape on the installed jax and records what it refuses.

    python -m yarn_jax.bench mosaic-probe [--seq 8192,32768] [--out FILE]

32 query heads, 4 kv heads, head dim 64 (TinyLlama's), batch 1. cuDNN: causal and full, forward and
forward+backward, bf16. Mosaic: forward (causal and full, several block shapes) and the full-attention
forward+backward (its backward refuses causal masks) in bf16 and float16. TFLOP/s count 4 T^2 N H per
full forward (half for causal) and 2.5x that for the backward. Every refusal is recorded as a row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from yarn_jax.bench import fwd_bwd, kernel_time


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench mosaic-probe")
    p.add_argument("--seq", default="8192,32768")
    p.add_argument("--out", default="bench_results/mosaic_gpu_attention_probe.json")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mosaic

    n, k, h = 32, 4, 64
    rows = []

    def record(seq, name, fn, args, flops):
        try:
            s = kernel_time(jax.jit(fn), *args, calls=5)
            rows.append({"seq": seq, "kernel": name, "ms": s * 1e3, "tflops": flops / s / 1e12})
        except Exception as e:  # noqa: BLE001  a refusal is a finding here
            rows.append({"seq": seq, "kernel": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)

    for seq in [int(s) for s in a.seq.split(",")]:
        keys = jax.random.split(jax.random.key(seq), 4)
        qkvo = [jax.random.normal(key, (1, seq, heads, h), jnp.bfloat16) for key, heads in zip(keys, (n, k, k, n),
                                                                                               strict=True)]
        full = 4 * seq * seq * n * h
        for causal in (True, False):
            flops = full * (0.5 if causal else 1.0)

            def cudnn(q, k, v, causal=causal):
                return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

            record(seq, f"cudnn causal={causal} fwd", cudnn, qkvo[:3], flops)
            record(seq, f"cudnn causal={causal} fwd+bwd", fwd_bwd(cudnn), qkvo, 3.5 * flops)
            for block_q, block_kv in ((64, 64), (64, 128), (128, 64), (128, 128)):
                cfg = mosaic.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=2, causal=causal)
                for dtype in (jnp.bfloat16, jnp.float16):
                    record(seq, f"mosaic causal={causal} fwd {block_q}/{block_kv} {jnp.dtype(dtype).name}",
                           lambda q, k, v, cfg=cfg: mosaic.attention(q, k, v, cfg),
                           [x.astype(dtype) for x in qkvo[:3]], flops)
        for block_q, block_kv in ((64, 64), (128, 64)):
            cfg = mosaic.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dkv=block_q,
                                      block_kv_dkv=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
            for dtype in (jnp.bfloat16, jnp.float16):
                record(seq, f"mosaic causal=False fwd+bwd (bwd {block_q}/{block_kv}) {jnp.dtype(dtype).name}",
                       fwd_bwd(lambda q, k, v, cfg=cfg: mosaic.attention(q, k, v, cfg)),
                       [x.astype(dtype) for x in qkvo], 3.5 * full)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| seq | kernel | ms | TFLOP/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['kernel']} | " + (f"{r['ms']:.2f} | {r['tflops']:.0f} |" if "ms" in r
                                                    else f"{r['error'][:80]} | |"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=2))
    return 0
