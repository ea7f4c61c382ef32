"""Attention kernels: correctness against the reference, and fwd+bwd TFLOP/s.

    python -m yarn_jax.bench attention [--seq 8192,32768] [--impl cudnn|splash|reference|ring]
                                       [--heads 32] [--kv-heads 32,8] [--head-dim 128]

Causal, bfloat16, batch 1. `ring` is ring attention over every local device on a 'seq' mesh axis (on
one device, a ring of one: its per-block kernel alone), inputs in the zigzag order. FLOPs of causal
fwd+bwd: 4 * T^2 * N * H * (1 fwd + 2.5 bwd) / 2, the convention of the FlashAttention papers. Timing:
`bench.kernel_time` (10 calls back to back, median of 3 batches; before session 5, 10 calls each
synchronised with the host, which charged each call its dispatch). Correctness: the kernel's logits in
a small bf16 model (ring: its output on bf16 inputs, T = 2048) against the float32 reference, relative
to their maximum.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from yarn_jax.bench import fwd_bwd, kernel_time


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


def _inputs(t: int, n: int, kv_heads: int, h: int, impl: str):
    """(q, k, v, token indices, attention fn): random bf16 inputs, batch 1. For `ring`, the sequence is in
    the zigzag order over every local device and the function is ring attention over them."""
    import jax
    import jax.numpy as jnp

    from yarn_jax import attention, ring, sharding
    from yarn_jax.config import AttentionImpl, RingLayout

    if impl == "ring":
        perm = ring.permutation(t, jax.device_count(), RingLayout.ZIGZAG)
        fn = ring.ring_attention(sharding.make_mesh(seq=jax.device_count()))
    else:
        perm, fn = jnp.arange(t), attention.select(AttentionImpl(impl))
    keys = jax.random.split(jax.random.key(t), 3)
    q, k, v = (jax.random.normal(key, (1, t, heads, h), jnp.bfloat16)[:, perm]
               for key, heads in zip(keys, (n, kv_heads, kv_heads), strict=True))
    return q, k, v, jnp.asarray(perm, jnp.int32)[None], fn


def ring_check() -> float:
    """Max |ring - reference| relative to max |reference| on bf16 inputs, T = 2048, over all local devices."""
    import jax.numpy as jnp

    from yarn_jax.attention import reference

    q, k, v, idx, attend = _inputs(2048, 8, 2, 64, "ring")
    want = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), None, None, idx, idx)
    got = attend(q, k, v, None, None, idx, idx).astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench attention")
    p.add_argument("--seq", default="8192,32768")
    p.add_argument("--impl", default="cudnn", help="an attention kernel (cudnn, splash, reference) or ring")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", default="32,8", help="comma list")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default="bench_results/attention.json")
    a = p.parse_args(argv)
    import jax

    rows = []
    n, h = a.heads, a.head_dim
    for t in [int(s) for s in a.seq.split(",")]:
        for kv_heads in [int(x) for x in a.kv_heads.split(",")]:
            q, k, v, idx, fn = _inputs(t, n, kv_heads, h, a.impl)
            do = jax.random.normal(jax.random.key(t + 1), q.shape, q.dtype)
            attend = lambda q, k, v, idx=idx, fn=fn: fn(q, k, v, None, None, idx, idx)  # noqa: E731
            flops = 4 * t * t * n * h / 2
            tf = kernel_time(jax.jit(attend), q, k, v, calls=10)
            tb = kernel_time(jax.jit(fwd_bwd(attend)), q, k, v, do, calls=10)
            rows.append({"seq": t, "kv_heads": kv_heads, "fwd_tflops": flops / tf / 1e12,
                         "fwd_bwd_tflops": 3.5 * flops / tb / 1e12, "fwd_ms": tf * 1e3, "fwd_bwd_ms": tb * 1e3})
    err = ring_check() if a.impl == "ring" else model_check(a.impl)
    print(f"{a.impl} on {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}; "
          f"{a.heads} heads, head dim {a.head_dim}; vs the float32 reference (bf16, T=2048): max relative "
          f"difference {err:.2e}")
    print("| seq | kv heads | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['kv_heads']} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} | "
              f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"impl": a.impl, "heads": n, "head_dim": h, "devices": jax.device_count(),
                                       "rel_err": err, "rows": rows}, indent=2))
    return 0 if err < 2e-2 else 1
