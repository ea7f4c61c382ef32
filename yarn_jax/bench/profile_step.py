"""Where the train step's time goes on the device: GPU kernel time by kind and the costliest kernels.

    python -m yarn_jax.bench profile --config configs/h200_1b.py --seq 8192 [--config.model.remat=attention]

Traces `--steps` steps of the benchmark's step (after 2 warm-ups) with jax.profiler, reads the trace back
(jax.profiler.ProfileData) and sums the kernels of the device's streams. Kinds: matmul (cuBLAS/cuBLASLt/
CUTLASS/nvjet), attention (cuDNN), memory (copies, sets), fusion (XLA's own kernels: elementwise, reductions,
Triton). Prints per-step milliseconds and shares of the step's wall time; writes the table as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path

KINDS = (("attention", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
         ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_", re.I)),
         ("memory", re.compile(r"memcpy|memset|copy", re.I)))


def kind(kernel: str) -> str:
    return next((k for k, pattern in KINDS if pattern.search(kernel)), "fusion")


def kernel_times(xplane: str) -> tuple[dict[str, float], dict[str, int]]:
    """Summed nanoseconds and counts per kernel name over the GPU planes' stream lines."""
    import jax

    total, count = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(xplane).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                total[event.name] += event.duration_ns
                count[event.name] += 1
    return dict(total), dict(count)


def main(argv: list[str]) -> int:
    import jax
    import jax.numpy as jnp

    from yarn_jax import run_config
    from yarn_jax.bench.train_step_bench import setup

    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench profile")
    p.add_argument("--config", default="configs/h200_1b.py")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the old spelling of --config.KEY=VALUE (kept for one release)")
    p.add_argument("--hlo", default=None, help="also write the compiled step's HLO text here")
    p.add_argument("--out", default=None, help="JSON results (default bench_results/profile_<seq>.json)")
    overrides, rest = run_config.split_overrides(argv)
    a = p.parse_args(rest)
    a.set += overrides
    _, step, state, batch = setup(run_config.load(a.config, a.set), a.seq)
    if a.hlo:
        Path(a.hlo).write_text(step.as_text())
    one = jnp.float32(1.0)
    for _ in range(2):
        state, m = step(state, batch, one)
    float(m["loss"])
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t = time.perf_counter()
        for _ in range(a.steps):
            state, m = step(state, batch, one)
        float(m["loss"])
        wall = (time.perf_counter() - t) / a.steps
        jax.profiler.stop_trace()
        (xplane,) = Path(d).rglob("*.xplane.pb")
        total, count = kernel_times(str(xplane))
    if not total:
        raise SystemExit("profile: the trace holds no GPU stream kernels (is this a GPU?)")
    by_kind = collections.Counter()
    for name, ns in total.items():
        by_kind[kind(name)] += ns
    ms = lambda ns: ns / a.steps / 1e6  # noqa: E731  per step
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, seq {a.seq}, {' '.join(a.set)}")
    print(f"step wall time {wall * 1e3:.1f} ms; kernels {ms(sum(total.values())):.1f} ms")
    print("| kind | ms/step | share of wall |\n|---|---|---|")
    for k, ns in by_kind.most_common():
        print(f"| {k} | {ms(ns):.1f} | {ms(ns) / (wall * 1e3):.1%} |")
    print("\n| kernel | kind | calls/step | ms/step |\n|---|---|---|---|")
    top = sorted(total, key=total.get, reverse=True)[:a.top]
    for name in top:
        print(f"| {name[:90]} | {kind(name)} | {count[name] / a.steps:.0f} | {ms(total[name]):.2f} |")
    out = Path(a.out or f"bench_results/profile_{a.seq}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seq": a.seq, "set": a.set, "wall_ms": wall * 1e3,
                               "kinds_ms": {k: ms(v) for k, v in by_kind.items()},
                               "top": [{"kernel": n, "kind": kind(n), "calls": count[n] / a.steps,
                                        "ms": ms(total[n])} for n in top]}, indent=2))
    return 0
