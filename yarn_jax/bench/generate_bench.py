"""Generation on one accelerator: prefill tokens/s and decode ms per step against the memory floor, side
by side with transformers eager and at its fast path (static cache + torch.compile).

    python -m yarn_jax.bench generate --config configs/h200_1b.py --prompt 32768,131072 [--batch 1,16]
        [--new 128] [--peer hf-torch,hf-compile]

Ours, as `generate.complete` runs it (bf16 parameters and KV cache, random weights and prompts): the
prefill (each row's prompt padded to the cache length; the median of 3 after a compiling one), then
`--new` tokens from the device loop (`decode_chunk`, DECODE_CHUNK steps per compiled call, greedy), timed
after a compiling run. Memory floor of a decode step: the bytes it must read once (every weight, plus
the cache filled so far: the mean over the timed steps) over the device's bandwidth (hardware.py); the
ratio is ours over it. Peers (a separate process each, same shape and tokens, bf16, SDPA):
`model.generate` with the default dynamic cache (hf-torch) or `cache_implementation="static"`, with
which transformers compiles the decode step (hf-compile), timed by a streamer (the first new token ends
the prefill), after one untimed run of the same shapes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ("hf-torch", "hf-compile")
PEER = r'''
import json, sys, time, torch, transformers
shape, prompt, batch, new, static = json.loads(sys.argv[1]), *map(int, sys.argv[2:6])
dev = "cuda" if torch.cuda.is_available() else "cpu"
cfg = transformers.LlamaConfig(**shape, attn_implementation="sdpa", torch_dtype="bfloat16")
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
x = torch.randint(0, shape["vocab_size"], (batch, prompt), device=dev)

class Clock(transformers.generation.streamers.BaseStreamer):  # put() receives each new token, on the host
    def __init__(self): self.times = []
    def put(self, value): self.times.append(time.perf_counter())
    def end(self): pass

kw = dict(max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False, eos_token_id=None, pad_token_id=0,
          attention_mask=torch.ones_like(x))
if static:
    kw["cache_implementation"] = "static"
with torch.inference_mode():
    model.generate(x, **kw)  # compiles (static) and warms up
    clock = Clock()
    start = time.perf_counter()
    model.generate(x, streamer=clock, **kw)
ticks = clock.times[1:]  # the first put() is the prompt, then one per new token (read on the host)
prefill, decode = ticks[0] - start, (ticks[-1] - ticks[0]) / new
peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
print(json.dumps({"prefill_s": prefill, "decode_s": decode, "peak_gib": peak}))
'''


def _floor(cfg, batch: int, prompt: int, new: int, bandwidth: float | None) -> float | None:
    """Seconds per decode step to read every weight and the filled cache once (None: bandwidth unknown)."""
    if bandwidth is None:
        return None
    filled = prompt + new / 2  # the mean over the timed steps
    cache = 2 * cfg.num_layers * batch * filled * cfg.num_kv_heads * cfg.head_dim * 2  # k and v, bf16
    return (cfg.num_params() * 2 + cache) / bandwidth


def _model(config, prompt: int, new: int):
    from yarn_jax.run_config import model_config

    cfg, _ = model_config(config)
    cfg = cfg.replace(max_position_embeddings=max(prompt + new, cfg.max_position_embeddings))
    return cfg.with_execution(dtype="bfloat16", param_dtype="bfloat16")


def ours(config, prompt: int, batch: int, new: int) -> dict:
    import jax
    import numpy as np

    from yarn_jax import generate, hardware
    from yarn_jax.model import scaling
    from yarn_jax.model.llama import init_params

    cfg = _model(config, prompt, new)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    net = cfg.replace(rope_scaling=scaling.Default())  # as `complete` compiles it
    rows = list(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32))
    slots = generate.cache_length(prompt + new)
    freqs = generate.row_frequencies(cfg, [prompt] * batch)

    def prefill():
        cache = generate.init_cache(cfg, batch, slots)
        t = time.perf_counter()
        logits, cache = generate._prefill(net, params, cache, rows, freqs, None)
        logits.block_until_ready()
        return time.perf_counter() - t, logits, cache

    prefills = [prefill()[0] for _ in range(4)][1:]  # the first compiles
    decodes = []
    for _ in range(2):  # the first compiles
        _, logits, cache = prefill()
        t = time.perf_counter()
        generate._on_device(net, params, cache, logits, rows, new, freqs, 0.0, jax.random.key(0), None, None)
        decodes.append((time.perf_counter() - t) / new)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    floor = _floor(cfg, batch, prompt, new, hardware.peak_bandwidth(device))
    return {"prefill_s": statistics.median(prefills), "decode_s": decodes[-1], "floor_s": floor,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def peer(config, name: str, prompt: int, batch: int, new: int, timeout: float = 900) -> dict:
    m = config.model
    shape = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                 num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                 head_dim=m.head_dim, max_position_embeddings=prompt + new + 1)
    argv = [sys.executable, "-c", PEER, json.dumps(shape), str(prompt), str(batch), str(new),
            str(int(name == "hf-compile"))]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> list[str]:
    lines = ["| impl | prompt | batch | prefill tokens/s | decode ms/step | decode tokens/s | floor ms | x floor | "
             "peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['impl']} | {r['prompt']:,} | {r['batch']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | | |")
            continue
        floor = r.get("floor_s")
        vs = ("", "") if floor is None else (f"{floor * 1e3:.2f}", f"{r['decode_s'] / floor:.1f}")
        lines.append(f"{head} {r['batch'] * r['prompt'] / r['prefill_s']:,.0f} | {r['decode_s'] * 1e3:.2f} | "
                     f"{r['batch'] / r['decode_s']:,.0f} | {vs[0]} | {vs[1]} | {r['peak_gib']:.1f} |")
    return lines


def main(argv: list[str]) -> int:
    from yarn_jax import cli, run_config

    p = cli.ArgumentParser(prog="python -m yarn_jax.bench generate",
                           epilog="--config.KEY=VALUE overrides any key of the run config")
    p.add_argument("--config", default="configs/h200_1b.py", help="the run config whose model shape is timed")
    p.add_argument("--prompt", default="32768", type=cli.int_list, help="comma list of prompt lengths")
    p.add_argument("--batch", default="1", type=cli.int_list, help="comma list of batch sizes (prompts at once)")
    p.add_argument("--new", type=cli.count(1), default=128, help="decode steps timed")
    p.add_argument("--peer", default="", help=f"comma list of {', '.join(PEERS)} (none by default)")
    p.add_argument("--out", default="bench_results/generate.json", help="where the rows go (JSON)")
    overrides, rest = run_config.split_overrides(argv)
    a = p.parse_args(rest)
    peers = [x for x in a.peer.split(",") if x]
    if unknown := set(peers) - set(PEERS):
        p.error(f"--peer: expected a comma list of {', '.join(PEERS)}, got {', '.join(sorted(unknown))}")
    config = run_config.load(a.config, overrides)
    cases = [(n, b) for n in a.prompt for b in a.batch]
    rows = []
    for name in peers:  # first, while this process holds no GPU memory (JAX preallocates most of it once started)
        for n, b in cases:
            rows.append({"impl": name, "prompt": n, "batch": b, **peer(config, name, n, b, a.new)})
            print(json.dumps(rows[-1]), flush=True)
    import jax

    for n, b in cases:
        try:
            r = ours(config, n, b, a.new)
        except Exception as e:  # noqa: BLE001  out of memory is a result here
            r = {"error": str(e).splitlines()[0][:200]}
        rows.append({"impl": "yarn_jax", "prompt": n, "batch": b, **r})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, bf16, {a.new} decode steps")
    print("\n".join(_table(rows)))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                       "date": time.strftime("%Y-%m-%d"),
                                       "command": " ".join(["python -m yarn_jax.bench generate", *argv]),
                                       "new": a.new, "rows": rows}, indent=2))
    return 0
