"""Attention kernels and the ring's per-device work: correctness against the reference, fwd+bwd TFLOP/s.

    python -m yarn_jax.bench attention [--seq 8192,32768] [--impl cudnn|splash|reference]
                                       [--heads 32] [--kv-heads 32,8] [--head-dim 128] [--documents 1,4,16]
    python -m yarn_jax.bench attention --impl ring --seq 65536,131072 --ring 2,4,8 [--block auto|cudnn|...]
    python -m yarn_jax.bench attention --impl tokamax-mosaic [--seq ...]   (also tokamax-triton, -cudnn, -xla,
                                                                            pallas-triton, pallas-mgpu)

Causal, bfloat16, batch 1. `ring`: the work of one device of a ring of R over `--seq` total tokens, timed
on one device (`ring.device_work`: its R block steps with the masks and skips of the zigzag schedule, its
own K/V standing in for the others'; no communication), for the first and the last device of the ring,
next to the single-device kernel (`--block`'s, e.g. cuDNN) at the same per-device token count T / R.
FLOPs of causal fwd+bwd: 4 * T^2 * N * H * (1 fwd + 2.5 bwd) / 2 (the FlashAttention papers'
convention), over R for one device of a ring, over d for d equal packed documents (`--documents`: segment
ids, checked forward and backward against the reference with the same ids). Timing: `bench.kernel_time`
(10 calls back to back, median of 3 batches). Correctness: the kernel's logits in a small bf16 model
(ring: the ring over every local device, bf16 inputs, T = 2048) against the float32 reference, relative
to their maximum.

`tokamax-<implementation>`: a candidate kernel outside the model, `tokamax.dot_product_attention` (PyPI
`tokamax`, the `kernels` extra) with that implementation (mosaic: Mosaic GPU, FlashAttention-3 style on
Hopper; triton; cudnn; xla), causal, GQA without repeated K/V; checked forward and backward against the
float32 reference on bf16 inputs (T = 2048 or the longest --seq if shorter), so that a kernel is timed only
once it is known to compute the same attention. `pallas-triton` and `pallas-mgpu`: the flash attention
kernels jax itself ships (`jax.experimental.pallas.ops.gpu`: `attention.mha`, FlashAttention-2 in Pallas'
Triton backend, K/V repeated per query head, interpreted on CPU; `attention_mgpu.attention`, Mosaic GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

from yarn_jax import cli
from yarn_jax.bench import failure, fwd_bwd, kernel_time, rel_diff, tokamax
from yarn_jax.cli import RunError


def model_check(impl: str, t: int = 2048) -> float:
    """Max |logits(impl) - logits(reference)| relative to max |logits| on a small bf16 model, T = t."""
    import jax
    import numpy as np

    import yarn_jax

    cfg = yarn_jax.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=8,
                               num_kv_heads=2, head_dim=64, rope_scaling=yarn_jax.model.scaling.Yarn(4.0, 512)
                               ).with_execution(dtype="bfloat16")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, t))
    want = yarn_jax.forward(cfg.with_execution(attention="reference"), params, tokens)
    got = yarn_jax.forward(cfg.with_execution(attention=impl), params, tokens)
    return float(abs(got - want).max() / abs(want).max())


TOKAMAX = ("mosaic", "triton", "cudnn", "xla", "xla_chunked")  # tokamax.dot_product_attention's implementations
CANDIDATES = (*(f"tokamax-{kind}" for kind in TOKAMAX), "pallas-triton", "pallas-mgpu")
CANDIDATE_PREFIXES = ("tokamax-", "pallas-")  # kernels outside the model: `candidate` builds (or refuses) them


def candidate(impl: str):
    """A kernel outside the model -> attend(q [B, T, N, H], k, v [B, T, K, H]) -> [B, T, N, H], causal."""
    import jax
    import jax.numpy as jnp

    if impl not in CANDIDATES:
        raise SystemExit(f"--impl {impl}: expected a kernel (cudnn, splash, reference), ring, or one of "
                         f"{', '.join(CANDIDATES)}")
    if impl == "pallas-triton":  # FlashAttention-2 in Pallas' Triton backend; one head of K/V per query head
        from jax.experimental.pallas.ops.gpu import attention as triton_attention

        interpret = jax.devices()[0].platform == "cpu"  # so that CPU runs check it
        return lambda q, k, v: triton_attention.mha(
            q, *(jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v)), None,
            sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret)
    if impl == "pallas-mgpu":  # Mosaic GPU (Hopper, warp-specialised); no softmax scale of its own
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True,
                                             block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        return lambda q, k, v: attention_mgpu.attention((q * q.shape[-1] ** -0.5).astype(q.dtype), k, v, config)
    module = tokamax(f"--impl {impl}")
    kind = impl.removeprefix("tokamax-")
    return lambda q, k, v: module.dot_product_attention(q, k, v, is_causal=True, implementation=kind)


def kernel_check(attend, t: int, documents: int | None = None) -> float:
    """Max |attend - reference| over the output and dq, dk, dv, each relative to its reference's max, on
    bf16 inputs [1, T, 8, 64] with 2 kv heads (over `documents` equal documents a row if given); the
    reference in float32."""
    import jax
    import jax.numpy as jnp

    from yarn_jax.attention import reference

    q, k, v = _qkv(t, 8, 2, 64)
    do = jax.random.normal(jax.random.key(2), q.shape, q.dtype)
    index, seg = _index(t), _segments(t, documents)
    ref = lambda q, k, v: reference.attention(q, k, v, seg, seg, index, index)  # noqa: E731
    want = (ref(*(x.astype(jnp.float32) for x in (q, k, v))),
            *fwd_bwd(ref)(*(x.astype(jnp.float32) for x in (q, k, v, do))))
    got = (jax.jit(attend)(q, k, v), *jax.jit(fwd_bwd(attend))(q, k, v, do))
    return rel_diff(got, want)


def _qkv(t: int, n: int, kv_heads: int, h: int, perm=None):
    """Random bf16 q [1, T, N, H], k, v [1, T, K, H] (rows in the order `perm`, default as drawn)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(t), 3)
    xs = (jax.random.normal(key, (1, t, heads, h), jnp.bfloat16) for key, heads in zip(keys, (n, kv_heads, kv_heads),
                                                                                      strict=True))
    return tuple(xs if perm is None else (x[:, perm] for x in xs))


def _time(attend, q, k, v, flops: float) -> dict[str, float]:
    """fwd and fwd+bwd of `attend(q, k, v)`: ms and TFLOP/s (`flops`: the causal forward's)."""
    import jax

    do = jax.random.normal(jax.random.key(1), q.shape, q.dtype)
    tf = kernel_time(jax.jit(attend), q, k, v, calls=10)
    tb = kernel_time(jax.jit(fwd_bwd(attend)), q, k, v, do, calls=10)
    return {"fwd_tflops": flops / tf / 1e12, "fwd_bwd_tflops": 3.5 * flops / tb / 1e12, "fwd_ms": tf * 1e3,
            "fwd_bwd_ms": tb * 1e3}


def kernel_rows(impl: str, seqs: list[int], n: int, kv_list: list[int], h: int,
                documents: list[int | None]) -> list[dict]:
    """Each length x kv heads x documents a row (None: no segment ids; d: d equal documents, causal FLOPs
    over d)."""
    rows = []
    for t in seqs:
        for kv_heads in kv_list:
            for d in documents:
                got = _time(_attend(impl, t, d), *_qkv(t, n, kv_heads, h), 2 * t * t * n * h / (d or 1))
                rows.append({"seq": t, "kv_heads": kv_heads, **({"documents": d} if d else {}), **got})
    return rows


def _attend(impl: str, t: int, documents: int | None = None):
    """(q, k, v) -> out of `impl` at T = t, over `documents` equal documents a row (segment ids) if given."""
    from yarn_jax import attention
    from yarn_jax.model.execution import AttentionImpl

    if impl.startswith(CANDIDATE_PREFIXES):
        return candidate(impl)
    fn, seg = attention.select(AttentionImpl(impl)), _segments(t, documents)
    return lambda q, k, v: fn(q, k, v, seg, seg, *[_index(t)] * 2)


def _segments(t: int, documents: int | None):
    """[1, T] ids 1..documents in equal runs (the last takes the remainder), or None."""
    import jax.numpy as jnp

    if not documents:
        return None
    return jnp.minimum(jnp.arange(t, dtype=jnp.int32) // (t // documents), documents - 1)[None] + 1


def _index(t: int):
    """Token indices 0..T-1 [1, T] (the kernels' causal order)."""
    import jax.numpy as jnp

    return jnp.arange(t, dtype=jnp.int32)[None]


def ring_rows(block: str, seqs: list[int], rings: list[int], n: int, kv_list: list[int], h: int) -> list[dict]:
    """Per ring size: the single-device kernel at T / R tokens, then the first and last ring device."""
    from yarn_jax import attention
    from yarn_jax.attention import ring
    from yarn_jax.model.execution import AttentionImpl

    kernel = attention.block_kernel(AttentionImpl(block))
    single = attention.select(AttentionImpl(block))
    rows = []
    for t in seqs:
        for r in rings:
            local = t // r
            for kv_heads in kv_list:
                qkv = _qkv(local, n, kv_heads, h)
                base = _time(lambda q, k, v, local=local: single(q, k, v, None, None, *[_index(local)] * 2),
                             *qkv, 2 * local * local * n * h)
                rows.append({"seq": t, "ring": r, "device": "single", "kv_heads": kv_heads, **base})
                for device in (0, r - 1):
                    got = _time(ring.device_work(kernel, r, device), *qkv, 2 * t * t * n * h / r)
                    rows.append({"seq": t, "ring": r, "device": device, "kv_heads": kv_heads, **got,
                                 "vs_single": got["fwd_bwd_tflops"] / base["fwd_bwd_tflops"]})
    return rows


def ring_check() -> float:
    """Max |ring - reference| relative to max |reference| on bf16 inputs, T = 2048, over all local devices."""
    import jax
    import jax.numpy as jnp

    from yarn_jax import attention, sharding
    from yarn_jax.attention import reference, ring
    from yarn_jax.model.execution import AttentionImpl, RingLayout

    t, devices = 2048, jax.device_count()
    perm = ring.permutation(t, devices, RingLayout.ZIGZAG)
    q, k, v = _qkv(t, 8, 2, 64, perm)
    idx = jnp.asarray(perm, jnp.int32)[None]
    attend = ring.ring_attention(sharding.make_mesh(seq=devices), attention.block_kernel(AttentionImpl.AUTO),
                                 RingLayout.ZIGZAG)
    want = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), None, None, idx, idx)
    got = attend(q, k, v, None, None, idx, idx).astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def _table(impl: str, rows: list[dict]) -> list[str]:
    if impl != "ring":
        lines = ["| seq | kv heads | documents | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd ms | fwd+bwd ms |",
                 "|---|---|---|---|---|---|---|"]
        return lines + [f"| {r['seq']} | {r['kv_heads']} | {r.get('documents', '-')} | {r['fwd_tflops']:.0f} | "
                        f"{r['fwd_bwd_tflops']:.0f} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |" for r in rows]
    lines = ["| total seq | ring | device | kv heads | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd+bwd ms | vs single |",
             "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['seq']} | {r['ring']} | {r['device']} | {r['kv_heads']} | {r['fwd_tflops']:.0f} | "
                    f"{r['fwd_bwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} | "
                    + (f"{r['vs_single']:.0%} |" if "vs_single" in r else "- |") for r in rows]


def main(argv: list[str]) -> int:
    p = cli.ArgumentParser(prog="python -m yarn_jax.bench attention")
    p.add_argument("--seq", default="8192,32768", help="comma list; total tokens for --impl ring")
    p.add_argument("--impl", default="cudnn", help="an attention kernel (cudnn, splash, reference), ring, or a "
                   "candidate: tokamax-<implementation> (mosaic, triton, cudnn, xla), pallas-triton, pallas-mgpu")
    p.add_argument("--ring", default="2,4,8", help="--impl ring: ring sizes (comma list)")
    p.add_argument("--block", default="auto", help="--impl ring: the block kernel (auto, cudnn, splash, reference)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", default="32,8", help="comma list")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--documents", type=cli.int_list, default=[], help="a kernel: comma list of documents a row, "
                   "as segment ids (packed documents; default: none, one document without segment ids)")
    p.add_argument("--out", default="bench_results/attention.json")
    a = p.parse_args(argv)
    documents = a.documents or [None]
    if a.documents and (a.impl == "ring" or a.impl.startswith(CANDIDATE_PREFIXES)):
        raise RunError(f"--documents: for the model's kernels (cudnn, splash, reference), not --impl {a.impl}")
    import jax

    ints = lambda x: [int(s) for s in x.split(",")]  # noqa: E731
    t = min(2048, max(ints(a.seq)))  # the check's length: a CPU-sized run checks a CPU-sized model
    candidate_impl = a.impl.startswith(CANDIDATE_PREFIXES)
    if candidate_impl:  # checked before it is timed; a kernel that cannot run here says so in one line
        try:
            err = kernel_check(candidate(a.impl), t)
        except Exception as e:  # noqa: BLE001  a candidate that does not run here is a finding, not a crash
            raise RunError(f"--impl {a.impl} does not run on {jax.devices()[0].platform} "
                           f"(jax {jax.__version__}): {failure(e)}") from None
    if a.impl == "ring":
        rows = ring_rows(a.block, ints(a.seq), ints(a.ring), a.heads, ints(a.kv_heads), a.head_dim)
    else:
        rows = kernel_rows(a.impl, ints(a.seq), a.heads, ints(a.kv_heads), a.head_dim, documents)
    if not candidate_impl:  # the reference's check against itself is 0 by construction: not computed
        err = (ring_check() if a.impl == "ring" else
               max(kernel_check(_attend(a.impl, t, d), t, d) for d in documents) if a.documents else
               0.0 if a.impl == "reference" else model_check(a.impl, t))
    print(f"{a.impl} on {jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}; "
          f"{a.heads} heads, head dim {a.head_dim}; vs the float32 reference (bf16, T={t}): max relative "
          f"difference {err:.2e}")
    print("\n".join(_table(a.impl, rows)))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"impl": a.impl, "block": a.block, "heads": a.heads, "head_dim": a.head_dim,
                                       "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                       "devices": jax.device_count(), "rel_err": err, "rows": rows}, indent=2))
    return 0 if err < 2e-2 else 1
