"""The real train step on one accelerator, side by side with the PyTorch and JAX stacks a user would pick.

    python -m yarn_jax.bench train-step --config configs/h200_1b.py --seq 8192,32768 \
        [--peer hf-torch,hf-liger,torchtitan,maxtext]

Ours: the trainer's jitted step (forward, backward, AdamW update, donated state) on random tokens; the
median of `--steps` device-synchronised steps after 2 warm-ups. Peers (`train_peers.py`: transformers,
transformers + Liger, torchtitan, MaxText), each in its own process with the same model shape, tokens per
step and precision (`model.param_dtype` float32: float32 master weights and bf16 compute on both sides),
without and with activation checkpointing; the same timing; then each side's best and the ratio. A peer
that cannot run (its package missing, out of memory) is a row with the reason. Every row records its
exact `setting`. MFU uses (6N + 6 L d S) FLOPs per token over the device's peak bf16 FLOP/s (989 TFLOP/s
for H100/H200).

The kernel bound (`--bound`): the step's matmul FLOPs at the measured rate of one of its GEMMs plus L times
the measured forward+backward of the step's attention kernel at the step's shape, with everything else
(norms, activations, RoPE, loss, optimizer) free. Up to the GEMM rate being one shape's, no step made of
these kernels is faster, so it says how far the step is from its kernels and what ratio over the peer is
possible at all. Runs on CPU too (tests/test_bench.py).

`--compile-only`: ours compiled from abstract inputs and not run; its row is the program's memory (XLA's
`memory_analysis` of that backend's executable), so a card too small to run a step can say whether one
with more memory would hold it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from yarn_jax.bench import fwd_bwd, kernel_time, train_peers


def _compile(config, seq: int, documents: int = 0):
    """(cfg, optimizer, mesh, compiled step): the trainer's step for `config` on one device, batch 1 of
    `seq` tokens (packed `documents` a row: positions and attention per document), no accumulation,
    compiled from abstract inputs (nothing allocated)."""
    import jax

    from yarn_jax import aot, sharding

    config.data.update(dict(seq_len=seq, batch_size=1, positions="document" if documents else "chunk"))
    config.train.grad_accum = 1
    # the model takes `seq` tokens: the extended length (rope's, else the preset's) is at least seq
    config.rope.max_position_embeddings = max(seq, config.rope.get("max_position_embeddings")
                                              or config.model.max_position_embeddings or 0)
    mesh = sharding.make_mesh(data=1, fsdp=1, seq=1, tensor=1, devices=jax.devices()[:1])
    cfg, tx, traced = aot.trace_step(config, mesh)
    return cfg, tx, mesh, traced.lower().compile()


def setup(config, seq: int, documents: int = 0):
    """(cfg, compiled step, train state, batch): `_compile`'s step with its state and a batch of random
    tokens (one document per row, or `documents` of equal length, the last taking the remainder)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from yarn_jax import sharding, train_step
    from yarn_jax.model.llama import init_params

    cfg, tx, mesh, step = _compile(config, seq, documents)
    shardings = step.input_shardings[0][0]  # the train state's, as the step expects them
    params = jax.jit(lambda k: init_params(cfg, k), out_shardings=shardings.params)(jax.random.key(0))
    state = train_step.TrainState(params, jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                                  jnp.zeros((), jnp.int32))
    size = seq // documents if documents else seq
    segment = np.minimum(np.arange(seq) // size, max(documents, 1) - 1).astype(np.int32)  # [T] 0-based
    batch = {"tokens": np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq), dtype=np.int32),
             "positions": (np.arange(seq) - segment * size).astype(np.int32)[None], "segment_ids": segment[None] + 1}
    return cfg, step, state, jax.device_put(batch, sharding.batch_sharding(mesh))


def kernel_bound(cfg, seq: int) -> dict:
    """Seconds per step if only the step's matmuls and attention kernel took time (see the module doc)."""
    import jax
    import jax.numpy as jnp

    from yarn_jax import attention, train_step

    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    matmul_params = cfg.num_layers * (d * h * (2 * n + 2 * k) + 3 * d * f) + cfg.vocab_size * d  # lm head too
    rows = min(seq, 16384)  # the MLP up-projection of `rows` tokens: a GEMM of the step's own shape
    dtype = cfg.execution.dtype
    x, w = (jax.random.normal(key, shape, dtype) for key, shape in zip(jax.random.split(jax.random.key(0)),
                                                                        ((rows, d), (d, f)), strict=True))
    matmul_rate = 2 * rows * d * f / kernel_time(jax.jit(jnp.dot), x, w, calls=20)
    kernel = attention.select(cfg.execution.attention)
    index = jnp.arange(seq, dtype=jnp.int32)[None]
    qs = [jax.random.normal(key, (1, seq, heads, h), dtype)
          for key, heads in zip(jax.random.split(jax.random.key(1), 4), (n, k, k, n), strict=True)]

    attend = fwd_bwd(lambda q, k_, v: kernel(q, k_, v, None, None, index, index))
    attention_s = kernel_time(jax.jit(attend), *qs, calls=max(3, min(cfg.num_layers, 2**31 // seq**2)))
    step_s = seq * 6 * matmul_params / matmul_rate + cfg.num_layers * attention_s
    return {"step_s": step_s, "matmul_tflops": matmul_rate / 1e12, "attention_layer_s": attention_s,
            "flops_per_token": train_step.flops_per_token(cfg, seq)}


def ours(config, seq: int, steps: int, documents: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    cfg, step, state, batch = setup(config, seq, documents)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        state, m = step(state, batch, jnp.float32(1.0))
        float(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_s": statistics.median(times), "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "loss": float(m["loss"]), **memory(cfg, seq, step, config.optim.clip)}


def compiled_only(config, seq: int) -> dict:
    """`ours` without running: what the compiled step needs (`--compile-only`; nothing is allocated, so a
    card too small to run the step can still say whether a larger one would hold it)."""
    cfg, _, _, step = _compile(config, seq)
    return memory(cfg, seq, step, config.optim.clip)


def memory(cfg, seq: int, step, clip: float) -> dict:
    from yarn_jax import aot, train_step

    need = aot.program_bytes(step)  # this program's own need (peak_bytes_in_use is the process's maximum)
    host = step.memory_analysis().host_temp_size_in_bytes  # remat 'offload': the layer inputs, off the device
    return {"program_gib": need / 2**30, "host_gib": host / 2**30,
            "flops_per_token": train_step.flops_per_token(cfg, seq), "remat": cfg.execution.remat.value,
            "setting": setting(cfg, clip)}


def setting(cfg, clip: float) -> str:
    """Our row's precision, kernels and gradient clipping (`optim.clip`), in the peers' terms."""
    param, compute = train_peers.dtypes(cfg)
    return (f"{param} weights, {compute} compute" + (", FP8 projections" if cfg.execution.fp8 else "")
            + f", {cfg.execution.attention.value} attention" + train_peers.clipping(clip))


# each peer's names for its two settings: without (or with the least), with checkpointing
REMAT = {"hf-torch": ("none", "full"), "hf-liger": ("none", "full"), "torchtitan": ("none", "selective"),
         "maxtext": ("minimal_with_context", "full")}


# --peer-checkpointing -> which of each peer's two settings run (False: without checkpointing)
CHECKPOINTING = {"both": (False, True), "without": (False,), "with": (True,)}


def _peer_rows(cfg, peers: list[str], seqs: list[int], modes: list[str], steps: int,
               checkpointing: tuple[bool, ...], clip: float) -> list[dict]:
    """Every peer at every length, without and/or with activation checkpointing (`checkpointing`), one
    process each; the transformers peers in each of `modes` (eager, torch.compile), the others as their
    trainers run; each clipping its gradients' global norm to `clip` (0: not at all), as ours does."""
    rows = []
    for name in peers:
        for seq in seqs:
            for mode in modes if name.startswith("hf-") else ["eager"]:
                for remat in checkpointing:
                    label = REMAT[name][remat]
                    r = train_peers.peer(cfg, name, seq, steps, remat, mode == "compile", clip)
                    impl = name if mode == "eager" else f"{name} compile"
                    rows.append({"impl": impl, "seq": seq, "remat": label, **r})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _tokens(x: float | None) -> str:
    return f"{x:,.0f}" if x else "-"


def _ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}x" if x and y else "-"


def _print_tables(rows: list[dict], seqs: list[int], peak: float | None, comparisons: bool) -> None:
    """Every row's tokens/s, MFU and memory; with a peer or the kernel bound, the best of each per length."""
    import jax

    flops = {r["seq"]: r["flops_per_token"] for r in rows if "flops_per_token" in r}
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, batch 1")
    print("| impl | seq | remat | tokens/s | MFU | peak GiB (process) | GiB (program) | setting |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['seq']} | {r['remat']} | {r['error']} | | | | |")
            continue
        tps = r["seq"] / r["step_s"] if "step_s" in r else None  # None: compiled only
        mfu = f"{tps * flops.get(r['seq'], 0) / peak:.1%}" if tps and peak and r["seq"] in flops else "-"
        program = f"{r['program_gib']:.1f}" if "program_gib" in r else "-"
        peak_gib = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        host = f"; {r['host_gib']:.1f} GiB in host memory" if r.get("host_gib") else ""
        print(f"| {r['impl']} | {r['seq']} | {r['remat']} | {_tokens(tps)} | {mfu} | {peak_gib} | {program} | "
              f"{r.get('setting', '')}{host} |")
    def best(seq, kinds):  # (tokens/s, impl) of the fastest row of `kinds` at `seq`
        ok = [(seq / r["step_s"], r["impl"]) for r in rows if r["seq"] == seq and "step_s" in r
              and r["impl"].split()[0] in kinds]
        return max(ok, default=(None, "-"))

    if comparisons:
        print("\n| seq | yarn_jax best tokens/s | best peer | its tokens/s | ours / peer | ours / bound | "
              "bound / peer |")
        print("|---|---|---|---|---|---|---|")
        for seq in seqs:
            (ours_, _), (peer_, name), (bound, _) = (best(seq, k) for k in
                                                      (("yarn_jax",), train_peers.PEERS, ("kernel",)))
            print(f"| {seq} | {_tokens(ours_)} | {name} | {_tokens(peer_)} | {_ratio(ours_, peer_)} | "
                  f"{_ratio(ours_, bound)} | {_ratio(bound, peer_)} |")


def _parser():
    from yarn_jax import cli

    p = cli.ArgumentParser(prog="python -m yarn_jax.bench train-step",
                                epilog="--config.KEY=VALUE overrides any key of the run config")
    p.add_argument("--config", default="configs/h200_1b.py")
    p.add_argument("--seq", type=cli.int_list, default=[8192], help="comma-separated sequence lengths")
    p.add_argument("--steps", type=cli.count(1), default=5)
    p.add_argument("--peer", default="", help=f"comma list of {', '.join(train_peers.PEERS)} (none by default)")
    p.add_argument("--peer-modes", default="eager",
                   help="comma list of eager,compile (torch.compile; slower than eager on the H200 up to 32k and "
                        "not done compiling 64k after 7 minutes, so not run by default)")
    p.add_argument("--peer-checkpointing", choices=sorted(CHECKPOINTING), default="both",
                   help="each peer without activation checkpointing (its least recomputation), with it, or both")
    p.add_argument("--remat", default="", help="comma list of remat policies to time (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the old spelling of --config.KEY=VALUE (kept for one release)")
    p.add_argument("--bound", action="store_true", help="also time the kernel bound of each length")
    p.add_argument("--compile-only", action="store_true",
                   help="ours compiled, not run: the program's memory only (no peers, no bound)")
    p.add_argument("--documents", type=cli.count(0), default=0,
                   help="ours with this many packed documents a row (data.positions='document'; default 0: one)")
    p.add_argument("--out", default="bench_results/train_step.json")
    return p


def main(argv: list[str]) -> int:
    from yarn_jax import run_config

    p = _parser()
    overrides, rest = run_config.split_overrides(argv)
    a = p.parse_args(rest)
    overrides = a.set + overrides
    seqs = a.seq
    peers = [x for x in a.peer.split(",") if x]
    if unknown := sorted(set(peers) - set(train_peers.PEERS)):
        p.error(f"--peer: expected a comma list of {', '.join(train_peers.PEERS)}, got {', '.join(unknown)}")
    if a.documents and (peers or a.bound or a.compile_only):
        p.error("--documents: times ours only; drop --peer, --bound and --compile-only")
    if a.compile_only and (peers or a.bound):
        p.error("--compile-only: compiles ours only; drop --peer and --bound")
    modes = a.peer_modes.split(",")
    if bad := sorted(set(modes) - {"eager", "compile"}):
        p.error(f"--peer-modes: expected eager and/or compile, got {', '.join(bad)}")
    # the peers first, while this process holds no GPU memory (JAX preallocates most of it once started)
    config = run_config.load(a.config, overrides)
    cfg, _ = run_config.model_config(config)
    rows = _peer_rows(cfg, peers, seqs, modes, a.steps, CHECKPOINTING[a.peer_checkpointing], config.optim.clip)
    import jax

    from yarn_jax import hardware

    peak = hardware.peak_flops(jax.devices()[0])
    for seq in seqs:
        for remat in a.remat.split(",") if a.remat else [""]:
            config = run_config.load(a.config, overrides + ([f"model.remat={remat}"] if remat else []))
            try:
                r = compiled_only(config, seq) if a.compile_only else ours(config, seq, a.steps, a.documents)
            except ValueError:  # the user's config (a length the loss chunk does not divide, ...): one line
                raise
            except Exception as e:  # noqa: BLE001  out of memory is a result here
                r = {"error": str(e).splitlines()[0][:200]}
            impl = f"yarn_jax ({a.documents} documents a row)" if a.documents else "yarn_jax"
            rows.append({"impl": impl, "seq": seq, "remat": remat or config.model.remat, **r})
            print(json.dumps(rows[-1]), flush=True)
        if a.bound:
            rows.append({"impl": "kernel bound", "seq": seq, "remat": "-", "peak_gib": 0.0, **kernel_bound(cfg, seq)})
            print(json.dumps(rows[-1]), flush=True)
    _print_tables(rows, seqs, peak, comparisons=bool(peers or a.bound))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0
