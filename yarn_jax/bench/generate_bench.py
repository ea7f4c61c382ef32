"""Generation on one accelerator: prefill tokens/s and decode ms/token, side by side with transformers.

    python -m yarn_jax.bench generate --config configs/h200_1b.py --prompt 32768,131072 [--new 32] [--peer hf-torch]

Ours: `generate.step` as `generate` runs it (bf16 parameters and KV cache; the prompt padded to the cache
length, one compilation per cache length): the prefill of a random prompt, then `--new` decode steps,
each timed to the host (a decode step's logits go to the host to pick the next token). Peer (a separate
process, same model shape and tokens, bf16, SDPA): a forward of the prompt with `use_cache=True` and
`logits_to_keep=1`, then the same number of one-token forwards with the returned cache (what `generate`
does, without its sampling overhead). Median of 3 prefills; decode: the mean over `--new` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEER = r'''
import json, statistics, sys, time, torch, transformers
shape, prompt, new = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dev = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
cfg = transformers.LlamaConfig(**shape, attn_implementation="sdpa", torch_dtype="bfloat16")
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
x = torch.randint(0, shape["vocab_size"], (1, prompt), device=dev)
prefills = []
with torch.inference_mode():
    for _ in range(3):
        sync(); t = time.perf_counter()
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        sync(); prefills.append(time.perf_counter() - t)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(); t = time.perf_counter()
    for _ in range(new):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.item()
    decode = (time.perf_counter() - t) / new
peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
print(json.dumps({"prefill_s": statistics.median(prefills), "decode_s": decode, "peak_gib": peak}))
'''


def ours(config, prompt: int, new: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from yarn_jax import generate
    from yarn_jax.llama import init_params
    from yarn_jax.run_config import model_config

    cfg, _ = model_config(config)
    cfg = cfg.replace(max_position_embeddings=max(prompt + new, cfg.max_position_embeddings))
    cfg = cfg.with_execution(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    length = generate.cache_length(prompt + new)
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :prompt] = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt)
    freqs = generate.frequencies(cfg, prompt)
    prefills = []
    for _ in range(4):  # the first compiles
        cache = generate.init_cache(cfg, 1, length)
        t = time.perf_counter()
        logits, cache = generate.step(cfg, params, cache, jnp.asarray(tokens), jnp.int32(0), freqs,
                                      jnp.int32(prompt - 1), prefill=True)
        nxt = np.asarray(jnp.argmax(logits, -1))[:, None].astype(np.int32)
        prefills.append(time.perf_counter() - t)
    logits, cache = generate.step(cfg, params, cache, jnp.asarray(nxt), jnp.int32(prompt), freqs,
                                  prefill=False)  # compiles
    t = time.perf_counter()
    for i in range(new):
        logits, cache = generate.step(cfg, params, cache, jnp.asarray(nxt), jnp.int32(prompt + 1 + i), freqs,
                                      prefill=False)
        nxt = np.asarray(jnp.argmax(logits, -1))[:, None].astype(np.int32)
    decode = (time.perf_counter() - t) / new
    stats = jax.devices()[0].memory_stats() or {}
    return {"prefill_s": statistics.median(prefills[1:]), "decode_s": decode,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def peer(config, prompt: int, new: int) -> dict:
    m = config.model
    shape = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                 num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                 head_dim=m.head_dim, max_position_embeddings=prompt + new)
    r = subprocess.run([sys.executable, "-c", PEER, json.dumps(shape), str(prompt), str(new)],
                       capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    from yarn_jax import run_config

    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench generate",
                                epilog="--config.KEY=VALUE overrides any key of the run config")
    p.add_argument("--config", default="configs/h200_1b.py")
    p.add_argument("--prompt", default="32768", help="comma list of prompt lengths")
    p.add_argument("--new", type=int, default=32, help="decode steps timed")
    p.add_argument("--peer", choices=["hf-torch"], default=None)
    p.add_argument("--out", default="bench_results/generate.json")
    overrides, rest = run_config.split_overrides(argv)
    a = p.parse_args(rest)
    config = run_config.load(a.config, overrides)
    rows = []
    for n in [int(x) for x in a.prompt.split(",")]:
        if a.peer:  # first, while this process holds no GPU memory (JAX preallocates most of it once started)
            rows.append({"impl": "hf-torch", "prompt": n, **peer(config, n, a.new)})
            print(json.dumps(rows[-1]), flush=True)
    import jax

    for n in [int(x) for x in a.prompt.split(",")]:
        try:
            r = ours(config, n, a.new)
        except Exception as e:  # noqa: BLE001  out of memory is a result here
            r = {"error": str(e).splitlines()[0][:200]}
        rows.append({"impl": "yarn_jax", "prompt": n, **r})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, batch 1, bf16, {a.new} decode steps")
    print("| impl | prompt | prefill tokens/s | decode ms/token | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['prompt']} | {r['error']} | | |")
        else:
            print(f"| {r['impl']} | {r['prompt']} | {r['prompt'] / r['prefill_s']:,.0f} | "
                  f"{r['decode_s'] * 1e3:.2f} | {r['peak_gib']:.1f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                       "new": a.new, "rows": rows}, indent=2))
    return 0
