"""Attention kernels: correctness inside the model against the reference, and fwd+bwd TFLOP/s.

    python -m yarn_jax.bench attention [--seq 8192,32768] [--impl cudnn]

Causal, 32 heads (8 kv heads for GQA), head dim 128, bfloat16, batch 1. FLOPs of causal fwd+bwd:
4 * T^2 * N * H * (1 fwd + 2.5 bwd) / 2, the convention of the FlashAttention papers. Timing:
`bench.kernel_time` (10 calls back to back, median of 3 batches; before session 5, 10 calls each
synchronised with the host, which charged each call its dispatch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from yarn_jax.bench import kernel_time


def model_check(impl: str) -> float:
    """Max |logits(impl) - logits(reference)| relative to max |logits| on a small bf16 model, T = 2048."""
    import jax
    import numpy as np

    import yarn_jax

    cfg = yarn_jax.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                               num_kv_heads=2, head_dim=64, rope_scaling=yarn_jax.config.rope_lib.Yarn(4.0, 512),
                               dtype="bfloat16")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 2048))
    want = yarn_jax.forward(cfg.replace(attention="reference"), params, tokens)
    got = yarn_jax.forward(cfg.replace(attention=impl), params, tokens)
    return float(abs(got - want).max() / abs(want).max())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench attention")
    p.add_argument("--seq", default="8192,32768")
    p.add_argument("--impl", default="cudnn")
    p.add_argument("--out", default="bench_results/attention.json")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from yarn_jax import attention
    from yarn_jax.config import AttentionImpl

    kernel = attention.select(AttentionImpl(a.impl))
    rows = []
    for t in [int(s) for s in a.seq.split(",")]:
        for kv_heads in (32, 8):
            n, h = 32, 128
            key = jax.random.split(jax.random.key(t), 3)
            q = jax.random.normal(key[0], (1, t, n, h), jnp.bfloat16)
            k = jax.random.normal(key[1], (1, t, kv_heads, h), jnp.bfloat16)
            v = jax.random.normal(key[2], (1, t, kv_heads, h), jnp.bfloat16)
            idx = jnp.arange(t, dtype=jnp.int32)[None]

            def loss(q, k, v, idx=idx):
                return jnp.sum(kernel(q, k, v, None, None, idx, idx).astype(jnp.float32))

            fwd = jax.jit(lambda q, k, v, idx=idx: kernel(q, k, v, None, None, idx, idx))
            both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            flops = 4 * t * t * n * h / 2
            tf, tb = kernel_time(fwd, q, k, v, calls=10), kernel_time(both, q, k, v, calls=10)
            rows.append({"seq": t, "kv_heads": kv_heads, "fwd_tflops": flops / tf / 1e12,
                         "fwd_bwd_tflops": 3.5 * flops / tb / 1e12, "fwd_ms": tf * 1e3, "fwd_bwd_ms": tb * 1e3})
    err = model_check(a.impl)
    print(f"{a.impl} on {jax.devices()[0].device_kind}, jax {jax.__version__}; in-model logits vs reference "
          f"(bf16, T=2048): max relative difference {err:.2e}")
    print("| seq | kv heads | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['kv_heads']} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} | "
              f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"impl": a.impl, "model_rel_err": err, "rows": rows}, indent=2))
    return 0 if err < 2e-2 else 1
