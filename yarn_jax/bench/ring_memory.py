"""Per-device memory of the train step's forward+backward as the ring grows, at a fixed total length.

    python -m yarn_jax.bench ring-memory [--seq-len 16384]

Compiles (no run) the loss gradient on 1, 2, 4, 8 fake CPU devices with the mesh's seq axis = devices,
and prints `compiled.memory_analysis()` per device: temporaries should fall roughly as 1 / ring size
(the attention scores of one block fall as 1 / ring^2).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench ring-memory")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--rings", default="1,2,4,8", help="ring sizes (comma list, at most 8: fake CPU devices)")
    p.add_argument("--out", default="bench_results/ring_memory.json")
    a = p.parse_args(argv)
    # before the first backend use (jax initialises lazily): eight CPU devices
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    import yarn_jax
    from yarn_jax import sharding

    cfg = yarn_jax.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=64).with_execution(dtype="bfloat16", remat="full")
    rows = []
    for r in (int(x) for x in a.rings.split(",")):
        mesh = sharding.make_mesh(seq=r, devices=jax.devices()[:r])
        p_shard = yarn_jax.model.llama.param_shardings(cfg, mesh)
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              jax.eval_shape(lambda: yarn_jax.init_params(cfg, jax.random.key(0))), p_shard)
        tokens = jax.ShapeDtypeStruct((1, a.seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh))

        def loss(p, t, mesh=mesh):
            logits = yarn_jax.forward(cfg, p, t, mesh=mesh)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
        m = compiled.memory_analysis()
        rows.append({"ring": r, "temp_mib": m.temp_size_in_bytes / 2**20,
                     "args_mib": m.argument_size_in_bytes / 2**20, "out_mib": m.output_size_in_bytes / 2**20})
    print(f"train-step gradient, {a.seq_len} tokens, d={cfg.hidden_size}, {cfg.num_layers} layers, remat=full, "
          "per device (compiled.memory_analysis, CPU)")
    print("| ring (seq axis) | temp MiB | arguments MiB | outputs MiB | temp x ring / temp(1) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['ring']} | {row['temp_mib']:.1f} | {row['args_mib']:.1f} | {row['out_mib']:.1f} | "
              f"{row['temp_mib'] * row['ring'] / rows[0]['temp_mib']:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"seq_len": a.seq_len, "rows": rows}, indent=2))
    return 0
