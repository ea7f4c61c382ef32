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
from yarn_jax.model import rope as rope_lib
from yarn_jax.model import scaling as scaling_lib
from yarn_jax.model.config import LlamaConfig
from yarn_jax.model.llama import Cache, Llama, model, param_shardings, unstack_layers

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
    """Refuses (naming max_new) a KV cache that, with the decode loop's copy of the layers' weights
    (`unstack_layers`), is larger than its device's memory, before allocating it: the cache is split over
    the mesh's batch and seq axes (not over tensor, which the kv heads may not fill), the weights over
    fsdp and tensor."""
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit is None and device.platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"] * sharding.ring_size(mesh)
    cache = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * \
        np.dtype(cfg.execution.dtype).itemsize / split
    tables = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
    weights = (cfg.num_params() - tables) * np.dtype(cfg.execution.param_dtype).itemsize / \
        (1 if mesh is None else mesh.shape["fsdp"] * mesh.shape["tensor"])
    if limit and cache + weights > limit:
        raise ValueError(f"max_new (--max-new): a KV cache of {slots:,} slots x {batch} rows needs "
                         f"{cache / 2**30:,.1f} GiB per device and the decode loop's copy of the layers' weights "
                         f"{weights / 2**30:,.1f} GiB, more than the {limit / 2**30:,.1f} GiB of "
                         f"{device.platform} memory; generate fewer tokens or split the cache (mesh seq > 1)")


def frequencies(cfg: LlamaConfig, length: int) -> tuple[tuple[np.ndarray, ...], float]:
    """(turn parts of inv_freq, attention factor) at `length`, exact (float64 on the host)."""
    inv_freq, factor = rope_lib.frequencies(cfg.rope, length, dtype=np.float64)
    return rope_lib.turn_parts(inv_freq), float(factor)


def row_frequencies(cfg: LlamaConfig, lengths: list[int]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Each row's frequencies at its own length: (turn parts [B, 1, H/2], attention factor [B, 1, 1]),
    shaped to broadcast over a row's positions [B, T] (see rope.cos_sin)."""
    rows = [frequencies(cfg, n) for n in lengths]
    parts = tuple(np.stack([r[0][i] for r in rows])[:, None] for i in range(3))
    return parts, np.asarray([r[1] for r in rows], np.float32)[:, None, None]


@functools.partial(jax.jit, static_argnames=("cfg", "prefill", "mesh"), donate_argnames=("cache",))
def step(cfg: LlamaConfig, params: Any, cache: Cache, tokens: jax.Array, start: jax.Array, freqs: Any,
         last: jax.Array | None = None, *, prefill: bool, mesh: Mesh | None = None) -> tuple[jax.Array, Cache]:
    """tokens [B, t] at positions start[b]..start[b]+t-1 of each row (start [B] or one number) ->
    (logits [B, V] float32 of each row's token last[b] (None: the last of `tokens`), new cache). A
    prefill (start 0) fills the whole cache: its `tokens` are each row's prompt padded on the right to the
    cache length (one compilation for every prompt length), causal attention keeps the padding from
    touching the real tokens, whose last logits `last` selects; a row's padded slots are overwritten by its
    new tokens before any query sees them.

    With the mesh's seq axis R > 1 the cache is split over it in the ring's order (slot j holds token
    perm[j], device i the slots of its ring block): a prefill runs the model on the permuted sequence
    with ring attention, and each decode step writes its token to that token's slot and attends to
    every shard (`attention.decode_for_mesh`)."""
    b, t = tokens.shape
    start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))  # a number: every row's
    last = None if last is None else jnp.broadcast_to(jnp.asarray(last, jnp.int32), (b,))
    attend, layout = attention.for_mesh(cfg.execution, mesh, cache.k.shape[2])  # the cache's slots are in its order
    slot_index = None if layout.perm is None else jnp.asarray(layout.perm, jnp.int32)
    if prefill and slot_index is not None:  # the whole cache, in the layout's order
        tokens, positions = layout.apply(tokens), layout.index(b, t)
        last = jnp.take(jnp.asarray(np.argsort(layout.perm), jnp.int32), last)  # the slot of token `last`
    else:
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)
    net = model(cfg, attend, attention.decode_for_mesh(mesh), mesh)
    hidden, cache = net.apply({"params": params}, tokens, positions=positions, cache=cache, start=start,
                              freqs=freqs, prefill=prefill, slot_index=slot_index, method=Llama.decode)
    hidden = hidden[:, -1] if last is None else jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return net.apply({"params": params}, hidden, method=Llama.unembed), cache


def _prefill(cfg, params, cache, rows: list[np.ndarray], freqs, mesh) -> tuple[jax.Array, Any]:
    """Every row's whole sequence into the cache (right-padded): (logits [B, V] of each row's last token,
    cache)."""
    padded = np.zeros((len(rows), cache.k.shape[2]), np.int32)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    last = np.asarray([len(r) - 1 for r in rows], np.int32)
    return step(cfg, params, cache, jnp.asarray(padded), jnp.zeros(len(rows), jnp.int32), freqs, jnp.asarray(last),
                prefill=True, mesh=mesh)


def generate(cfg: LlamaConfig, params: Any, prompt: np.ndarray, max_new: int, **kwargs) -> np.ndarray:
    """prompt [B, T0] -> [B, T0 + max_new] tokens; see `complete` for the keyword arguments."""
    prompt = np.asarray(prompt, np.int32)
    return np.concatenate([prompt, complete(cfg, params, list(prompt), max_new, **kwargs)], axis=1)


def complete(cfg: LlamaConfig, params: Any, prompts: list[np.ndarray], max_new: int, *, temperature: float = 0.0,
             key: jax.Array | None = None, eos_id: int | None = None, dynamic_bucket: int = 1,
             mesh: Mesh | None = None) -> np.ndarray:
    """Prompts of any lengths (a list of [T_b] token arrays, run as one batch) -> their new tokens
    [B, max_new] (greedy when temperature == 0); each row equals that prompt generated alone. Rows that
    emitted `eos_id` keep emitting it. See the module docstring for `dynamic_bucket`. With `mesh`,
    parameters and the cache are sharded by the training rules (batch over data x fsdp, heads over tensor,
    the cache's slots over seq: a prompt longer than one device's memory prefills with ring attention)."""
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("prompt: expected at least one prompt of at least one token")
    b = len(prompts)
    if max_new == 0:
        return np.zeros((b, 0), np.int32)
    slots = cache_length(max(len(p) for p in prompts) + max_new, sharding.ring_size(mesh))
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
    bucket = lambda n: -(-n // dynamic_bucket) * dynamic_bucket  # noqa: E731
    freqs_at = lambda new: row_frequencies(cfg, [bucket(len(p) + new) for p in prompts])  # noqa: E731
    freqs = freqs_at(0)
    logits, cache = _prefill(net_cfg, params, cache, prompts, freqs, mesh)
    key = jax.random.key(0) if key is None else key
    if _same(freqs_at(max_new), freqs):  # scalings grow with the length: fixed in between
        return _on_device(net_cfg, params, cache, logits, prompts, max_new, freqs, temperature, key, eos_id, mesh)
    return _from_host(net_cfg, params, cache, logits, prompts, max_new, freqs_at, temperature, key, eos_id, mesh)


DECODE_CHUNK = 128  # new tokens per compiled decode loop (the host receives them chunk by chunk): the per-chunk
# copy of the layers' weights (`unstack_layers`) spread over more tokens: 1.45 -> 1.36 ms/token from 32 at a 32k
# cache on an H200 (NOTES.md); the price: up to 127 steps past every row's EOS before the host stops the loop


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "sample", "mesh"), donate_argnames=("cache",))
def decode_chunk(cfg: LlamaConfig, params: Any, cache: Cache, logits: jax.Array, start: jax.Array, freqs: Any,
                 key: jax.Array, temperature: jax.Array, done: jax.Array, eos: jax.Array, *, chunk: int,
                 sample: bool, mesh: Mesh | None = None) -> tuple[jax.Array, ...]:
    """`chunk` new tokens in one compiled loop on the device, from the logits [B, V] of each row's token
    before its position start[b]: each picked (greedy, or sampled at `temperature` with a key split per
    token, as the host loop does), rows `done` (past EOS) emit `eos`, then fed through the cached model.
    Returns (tokens [B, chunk], the next logits, cache, key, done)."""
    params = unstack_layers(params)  # once per chunk, outside the steps (see unstack_layers)

    def body(carry, _):
        logits, cache, pos, key, done = carry
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, logits / temperature) if sample else jnp.argmax(logits, axis=-1)
        nxt = jnp.where(done, eos, nxt).astype(jnp.int32)
        done = done | (nxt == eos)
        logits, cache = step(cfg, params, cache, nxt[:, None], pos, freqs, prefill=False, mesh=mesh)
        return (logits, cache, pos + 1, key, done), nxt

    (logits, cache, _, key, done), tokens = jax.lax.scan(body, (logits, cache, start, key, done), None, chunk)
    return tokens.T, logits, cache, key, done


def _on_device(cfg, params, cache, logits, prompts, max_new, freqs, temperature, key, eos_id, mesh) -> np.ndarray:
    """New tokens in compiled chunks on the device (the frequencies stay fixed over the generation)."""
    b = len(prompts)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    out, done, made = [], jnp.zeros(b, bool), 0
    eos = jnp.int32(-1 if eos_id is None else eos_id)  # -1: no token id, never "done"
    while made < max_new:
        n = min(DECODE_CHUNK, max_new - made)
        tokens, logits, cache, key, done = decode_chunk(
            cfg, params, cache, logits, jnp.asarray(lengths + made), freqs, key, jnp.float32(temperature or 1.0),
            done, eos, chunk=n, sample=temperature > 0, mesh=mesh)
        out.append(np.asarray(tokens))
        made += n
        if made < max_new and eos_id is not None and bool(np.all(np.asarray(done))):  # every row past EOS
            out.append(np.full((b, max_new - made), eos_id, np.int32))
            break
    return np.concatenate(out, axis=1)


def _from_host(cfg, params, cache, logits, prompts, max_new, freqs_at, temperature, key, eos_id, mesh) -> np.ndarray:
    """New tokens one step at a time from the host, the cache rebuilt whenever a row's frequencies move."""
    b = len(prompts)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    out, done, freqs = [], np.zeros(b, bool), freqs_at(0)
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
        new = freqs_at(i + 1)
        if _same(new, freqs):
            logits, cache = step(cfg, params, cache, jnp.asarray(out[-1]), jnp.asarray(lengths + i), freqs,
                                 prefill=False, mesh=mesh)
        else:  # the frequencies moved: rebuild the whole cache with them
            freqs, made = new, np.concatenate(out, axis=1)
            rows = [np.concatenate([p, m]) for p, m in zip(prompts, made, strict=True)]
            logits, cache = _prefill(cfg, params, cache, rows, freqs, mesh)
    return np.concatenate(out, axis=1)


def _same(a: tuple, b: tuple) -> bool:
    return np.array_equal(a[1], b[1]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from yarn_jax import cli, convert
    from yarn_jax.io import checkpoint
    from yarn_jax.io import tokenizer as tokenizer_lib

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
