"""Greedy and sampled decoding with a KV cache, exact for dynamic RoPE scaling.

    python -m yarn_jax.generate --checkpoint CKPT --prompt "..." [--max-new 64] [--tokenizer TOKENIZER]

Dynamic NTK / dynamic YaRN change the frequencies as the sequence grows. Re-rotating cached keys (or
caching them before RoPE) is not enough for exactness: from the second layer on, cached keys and values
come from hidden states that attended with the old frequencies. So whenever the frequencies of the new
length differ from those the cache was built with, the cache is rebuilt by one prefill of the whole
sequence; tokens then equal a full recomputation at every step. The Python API's `dynamic_bucket` > 1 rounds the length
that dynamic methods scale to up to a multiple of the bucket, so rebuilds happen once per bucket
(exact with respect to recomputation at that bucketed length).

While the frequencies stay fixed (every static scaling; dynamic ones until the sequence passes their
trained length) the new tokens come from `decode_chunk`, a compiled loop of DECODE_CHUNK steps on the
device (the token picked there, the cache donated), the host receiving them chunk by chunk.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from yarn_jax import attention, sharding
from yarn_jax import rope as rope_lib
from yarn_jax import scaling as scaling_lib
from yarn_jax.config import LlamaConfig
from yarn_jax.llama import Cache, Llama, model, param_shardings

CACHE_BUCKET = 256  # cache lengths round up to a multiple: prompts of similar length share compilations


def cache_length(tokens: int, ring: int = 1) -> int:
    """Cache slots for `tokens`: a multiple of CACHE_BUCKET and, split over a ring of R devices, of
    2R x 128, so that each device's two ring chunks are whole 128-token tiles of the fused kernels."""
    bucket = math.lcm(CACHE_BUCKET, 2 * ring * 128) if ring > 1 else CACHE_BUCKET
    return -(-tokens // bucket) * bucket


def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> Cache:
    """An empty cache, (k, v) [L, B, S, K, H] in the compute dtype."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return Cache(jnp.zeros(shape, cfg.execution.dtype), jnp.zeros(shape, cfg.execution.dtype))


def check_cache_fits(cfg: LlamaConfig, batch: int, slots: int, mesh: Mesh | None) -> None:
    """Refuses (naming max_new) a KV cache larger than its device's memory, before allocating it: the
    cache is split over the mesh's batch and seq axes (not over tensor, which the kv heads may not fill)."""
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit is None and device.platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"] * sharding.ring_size(mesh)
    need = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * \
        np.dtype(cfg.execution.dtype).itemsize / split
    if limit and need > limit:
        raise ValueError(f"max_new (--max-new): a KV cache of {slots:,} slots x {batch} rows needs "
                         f"{need / 2**30:,.1f} GiB per device, more than the {limit / 2**30:,.1f} GiB of "
                         f"{device.platform} memory; generate fewer tokens or split the cache (mesh seq > 1)")


def frequencies(cfg: LlamaConfig, length: int) -> tuple[tuple[np.ndarray, ...], float]:
    """(turn parts of inv_freq, attention factor) at `length`, exact (float64 on the host)."""
    inv_freq, factor = rope_lib.frequencies(cfg.rope, length, dtype=np.float64)
    return rope_lib.turn_parts(inv_freq), float(factor)


@functools.partial(jax.jit, static_argnames=("cfg", "prefill", "mesh"), donate_argnames=("cache",))
def step(cfg: LlamaConfig, params: Any, cache: Cache, tokens: jax.Array, start: jax.Array, freqs: Any,
         last: jax.Array | int = -1, *, prefill: bool, mesh: Mesh | None = None) -> tuple[jax.Array, Cache]:
    """tokens [B, t] at positions start..start+t-1 -> (logits [B, V] float32 of token `last`, new cache).
    A prefill (start 0) fills the whole cache: its `tokens` are padded to the cache length (one
    compilation for every prompt length), causal attention keeps the padding from touching the real
    tokens, whose logits `last` selects.

    With the mesh's seq axis R > 1 the cache is split over it in the ring's order (slot j holds token
    perm[j], device i the slots of its ring block): a prefill runs the model on the permuted sequence
    with ring attention, and each decode step writes its token to that token's slot and attends to
    every shard (`attention.decode_for_mesh`)."""
    b, t = tokens.shape
    attend, layout = attention.for_mesh(cfg.execution, mesh, cache.k.shape[2])  # the cache's slots are in its order
    slot_index = None if layout.perm is None else jnp.asarray(layout.perm, jnp.int32)
    if prefill and slot_index is not None:  # the whole cache, in the layout's order
        tokens, positions = layout.apply(tokens), layout.index(b, t)
        last = jnp.take(jnp.asarray(np.argsort(layout.perm), jnp.int32), last)  # the slot of token `last`
    else:
        positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    net = model(cfg, attend, attention.decode_for_mesh(mesh), mesh)
    hidden, cache = net.apply({"params": params}, tokens, positions=positions, cache=cache, start=start,
                              freqs=freqs, prefill=prefill, slot_index=slot_index, method=Llama.decode)
    return net.apply({"params": params}, jnp.take(hidden, last, axis=1), method=Llama.unembed), cache


def _prefill(cfg, params, cache, seq: np.ndarray, freqs, mesh) -> tuple[jax.Array, Any]:
    padded = np.zeros((seq.shape[0], cache.k.shape[2]), np.int32)
    padded[:, :seq.shape[1]] = seq
    return step(cfg, params, cache, jnp.asarray(padded), jnp.int32(0), freqs, jnp.int32(seq.shape[1] - 1),
                prefill=True, mesh=mesh)


def generate(cfg: LlamaConfig, params: Any, prompt: np.ndarray, max_new: int, *, temperature: float = 0.0,
             key: jax.Array | None = None, eos_id: int | None = None, dynamic_bucket: int = 1,
             mesh: Mesh | None = None) -> np.ndarray:
    """prompt [B, T0] -> [B, T0 + max_new] tokens (greedy when temperature == 0). Rows that emitted
    `eos_id` keep emitting it. See the module docstring for `dynamic_bucket`. With `mesh`,
    parameters and the cache are sharded by the training rules (batch over data x fsdp, heads over tensor,
    the cache's slots over seq: a prompt longer than one device's memory prefills with ring attention)."""
    prompt = np.asarray(prompt, np.int32)
    b, t0 = prompt.shape
    scale_len = lambda n: -(-n // dynamic_bucket) * dynamic_bucket  # noqa: E731
    slots = cache_length(t0 + max_new, sharding.ring_size(mesh))
    check_cache_fits(cfg, b, slots, mesh)
    cache = init_cache(cfg, b, slots)
    # `step` takes the frequencies as an argument, so the scaling method need not key its compilation:
    # every RoPE variant of one model shape shares the compiled prefill and decode steps.
    net_cfg = cfg.replace(rope_scaling=scaling_lib.Default())
    if mesh is not None:
        sharding.check_batch(mesh, b, cache.k.shape[2])
        params = jax.device_put(params, param_shardings(cfg, mesh))
        kv = sharding.logical_sharding(mesh, ("layers", "batch", "seq", "kv_heads", "head_dim"))
        cache = jax.device_put(cache, Cache(kv, kv))
    return _decode(cfg, net_cfg, params, cache, prompt, max_new, temperature, key, eos_id, scale_len, mesh)


DECODE_CHUNK = 32  # new tokens per compiled decode loop: the host receives them chunk by chunk


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "sample", "mesh"), donate_argnames=("cache",))
def decode_chunk(cfg: LlamaConfig, params: Any, cache: Cache, logits: jax.Array, start: jax.Array, freqs: Any,
                 key: jax.Array, temperature: jax.Array, done: jax.Array, eos: jax.Array, *, chunk: int,
                 sample: bool, mesh: Mesh | None = None) -> tuple[jax.Array, ...]:
    """`chunk` new tokens in one compiled loop on the device, from the logits [B, V] of the token before
    position `start`: each picked (greedy, or sampled at `temperature` with a key split per token, as the
    host loop does), rows `done` (past EOS) emit `eos`, then fed through the cached model. Returns (tokens
    [B, chunk], the next logits, cache, key, done)."""
    def body(carry, _):
        logits, cache, pos, key, done = carry
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, logits / temperature) if sample else jnp.argmax(logits, axis=-1)
        nxt = jnp.where(done, eos, nxt).astype(jnp.int32)
        done = done | (nxt == eos)
        logits, cache = step(cfg, params, cache, nxt[:, None], pos, freqs, -1, prefill=False, mesh=mesh)
        return (logits, cache, pos + 1, key, done), nxt

    (logits, cache, _, key, done), tokens = jax.lax.scan(body, (logits, cache, start, key, done), None, chunk)
    return tokens.T, logits, cache, key, done


def _decode(cfg, net_cfg, params, cache, prompt, max_new, temperature, key, eos_id, scale_len, mesh) -> np.ndarray:
    """Tokens after the prompt: in compiled chunks on the device while the frequencies stay those of the
    prompt's length (every static scaling, and dynamic ones inside their trained length), else one step at
    a time from the host, rebuilding the cache whenever the frequencies move."""
    b, t0 = prompt.shape
    freqs = frequencies(cfg, scale_len(t0))
    logits, cache = _prefill(net_cfg, params, cache, prompt, freqs, mesh)
    key = jax.random.key(0) if key is None else key
    if _same(frequencies(cfg, scale_len(t0 + max_new)), freqs):  # scalings grow with the length: fixed between
        out, done, left = [prompt], jnp.zeros(b, bool), max_new
        eos = jnp.int32(-1 if eos_id is None else eos_id)  # -1: no token id, never "done"
        while left:
            n = min(DECODE_CHUNK, left)
            tokens, logits, cache, key, done = decode_chunk(
                net_cfg, params, cache, logits, jnp.int32(t0 + max_new - left), freqs, key,
                jnp.float32(temperature or 1.0), done, eos, chunk=n, sample=temperature > 0, mesh=mesh)
            out.append(np.asarray(tokens))
            left -= n
            if left and eos_id is not None and bool(np.all(np.asarray(done))):  # every row past EOS
                out.append(np.full((b, left), eos_id, np.int32))
                break
        return np.concatenate(out, axis=1)
    out, done = [prompt], np.zeros(b, bool)
    for i in range(max_new):
        if temperature > 0:
            key, sub = jax.random.split(key)
            nxt = np.asarray(jax.random.categorical(sub, logits / temperature))
        else:
            nxt = np.asarray(jnp.argmax(logits, axis=-1))
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
            done |= nxt == eos_id
        out.append(nxt[:, None].astype(np.int32))
        if i + 1 == max_new:
            break
        new = frequencies(cfg, scale_len(t0 + i + 1))
        if _same(new, freqs):
            logits, cache = step(net_cfg, params, cache, jnp.asarray(out[-1]), jnp.int32(t0 + i), freqs, -1,
                                 prefill=False, mesh=mesh)
        else:  # the frequencies moved: rebuild the whole cache with them
            freqs = new
            logits, cache = _prefill(net_cfg, params, cache, np.concatenate(out, axis=1), freqs, mesh)
    return np.concatenate(out, axis=1)


def _same(a: tuple, b: tuple) -> bool:
    return a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from yarn_jax import checkpoint, cli, convert
    from yarn_jax import tokenizer as tokenizer_lib

    p = cli.ArgumentParser(prog="python -m yarn_jax.generate", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="an Orbax checkpoint directory (convert's or the trainer's)")
    src.add_argument("--hf", help="a Hugging Face model directory")
    p.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one (default: the "
                                       "model's own)")
    p.add_argument("--prompt", required=True, help="the text to continue (BOS added when the tokenizer has one)")
    p.add_argument("--max-new", type=cli.count(1), default=64, help="tokens to generate (fewer at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help=">= 0; 0 is greedy")
    p.add_argument("--seed", type=cli.count(0), default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (float32, bfloat16, float16)")

    def job() -> int:
        a = p.parse_args(argv)  # inside cli.run: argparse's refusal is a return status too
        if not a.temperature >= 0 or not math.isfinite(a.temperature):
            raise ValueError(f"--temperature: expected a finite number >= 0 (0 is greedy), got {a.temperature}")
        if a.checkpoint:
            cfg, params = checkpoint.load_checkpoint(a.checkpoint, dtype=a.dtype)
        else:
            cfg, params = convert.load_hf(a.hf, dtype=a.dtype)
        where = (f"--checkpoint {a.checkpoint}", checkpoint.tokenizer_of(a.checkpoint)) if a.checkpoint else \
            (f"--hf {a.hf}", Path(a.hf))
        tok = tokenizer_lib.resolve(a.tokenizer, [where])
        tok.check_fits(cfg.vocab_size, "--tokenizer")
        ids = np.asarray([tok.with_bos(tok.encode(a.prompt))])
        out = generate(cfg, params, ids, a.max_new, temperature=a.temperature, key=jax.random.key(a.seed),
                       eos_id=tok.eos_id)
        print(tok.decode([int(x) for x in out[0, ids.shape[1]:] if x != tok.eos_id]))
        return 0

    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
