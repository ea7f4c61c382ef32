"""Where a step's time goes on the device: GPU kernel time by kind and the costliest kernels.

    python -m yarn_jax.bench profile --config configs/h200_1b.py --seq 8192 [--config.model.remat=attention]
    python -m yarn_jax.bench profile --config configs/h200_1b.py --decode --seq 32768 [--batch 1] [--sequence 14]

Traces `--steps` steps (after 2 warm-ups) with jax.profiler, reads the trace back (jax.profiler.ProfileData)
and sums the kernels of the device's streams. A step is the train-step benchmark's step, or with
`--decode` one new token of generation (`generate.decode_chunk`, as `bench generate` times it) after a
`--seq`-token prompt: its kernels' time against its wall time shows what the step spends between kernels.
Kinds: matmul (cuBLAS/cuBLASLt/CUTLASS/nvjet), attention (cuDNN, flash-decoding), memory (copies, sets),
fusion (XLA's own kernels: elementwise, reductions, Triton). Kernels are summed by name without XLA's
numbering (`stem`: an unrolled layer's fusions are numbered apart). Prints per-step milliseconds and
shares of the step's wall time; writes the table as JSON. `--sequence N` adds N kernels from the trace's
middle in the order they ran, with the idle time before each (a decode layer's kernels, one after another).
XLA's fusions are also summed by the model operation each comes from (the compiled HLO's op_name metadata,
layer numbers dropped): which norm, activation or cast, forward or backward (`transpose(jvp(...))`).
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import tempfile
import time
from pathlib import Path

KINDS = (("attention", re.compile(r"cudnn|fmha|flash|sdpa", re.I)),
         ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_", re.I)),
         ("memory", re.compile(r"memcpy|memset|copy", re.I)))


def stem(kernel: str) -> str:
    """The kernel's name without XLA's numbering (`loop_add_fusion_20` -> `loop_add_fusion`): with the
    layers unrolled each layer's copy of a fusion has its own number."""
    return re.sub(r"([._]\d+)+$", "", kernel)


def op_names(hlo: str) -> dict[str, str]:
    """Each instruction of compiled HLO text -> the model operation it came from (its metadata's op_name,
    without the outer `jit(...)/` and with layer numbers dropped): where an XLA fusion's time belongs in
    the model, e.g. `transpose(jvp(Llama))/eval_jaxpr/layers/attn_norm/reduce_sum` (a norm's backward)."""
    names = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', hlo, re.M):
        names[m.group(1)] = re.sub(r"layers_\d+", "layers", re.sub(r"^jit\([^)]*\)/", "", m.group(2)))
    return names


def op_of(kernel: str, names: dict[str, str]) -> str | None:
    """The op_name of the fusion a kernel runs (the kernel is named as its instruction, `.N` as `_N`);
    None for library kernels (cuBLAS, cuDNN) and anything else not in the HLO."""
    return names.get(kernel) or names.get(re.sub(r"_(\d+)$", r".\1", kernel))


def fusions_by_op(events: list[tuple[int, int, str]], hlo: str) -> collections.Counter:
    """Nanoseconds of XLA's fusion kernels summed by `op_of` (a kernel the HLO does not name: its stem, in
    parentheses)."""
    names, by_op = op_names(hlo), collections.Counter()
    for _, ns, name in events:
        if kind(name) == "fusion":
            by_op[op_of(name, names) or f"({stem(name)})"] += ns
    return by_op


def kind(kernel: str) -> str:
    return next((k for k, pattern in KINDS if pattern.search(kernel)), "fusion")


def kernel_events(xplane: str) -> list[tuple[int, int, str]]:
    """(start ns, duration ns, name) of every kernel on the GPU planes' stream lines, in start order."""
    import jax

    events = []
    for plane in jax.profiler.ProfileData.from_file(xplane).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                events += [(e.start_ns, e.duration_ns, e.name) for e in line.events]
    return sorted(events)


def sequence(events: list[tuple[int, int, str]], n: int) -> list[dict]:
    """`n` consecutive kernels from the middle of the trace: each one's name, microseconds, and the idle
    microseconds before it (a decode step's kernels one after another: which ones a layer runs, in order)."""
    mid = len(events) // 2
    window = events[max(mid - 1, 0):mid + n]
    return [{"kernel": name, "us": dur / 1e3, "gap_us": (start - prev[0] - prev[1]) / 1e3}
            for prev, (start, dur, name) in itertools.pairwise(window)]


def _train(config, seq: int):
    """(run one step, finish: block on the last) for the train-step benchmark's step."""
    import jax.numpy as jnp

    from yarn_jax.bench.train_step_bench import setup

    _, step, state, batch = setup(config, seq)
    one, last = jnp.float32(1.0), {}

    def run():
        nonlocal state
        state, last["m"] = step(state, batch, one)

    return run, lambda: float(last["m"]["loss"]), step.as_text


def _decode(config, prompt: int, batch: int):
    """(run DECODE_CHUNK decode steps, finish, HLO text) after one prefill of `prompt` random tokens per row."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from yarn_jax import generate
    from yarn_jax.bench.generate_bench import _model
    from yarn_jax.model import scaling
    from yarn_jax.model.llama import init_params

    chunk = generate.DECODE_CHUNK
    cfg = _model(config, prompt, 8 * chunk)  # room for the warm-ups and the traced steps
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    net = cfg.replace(rope_scaling=scaling.Default())  # as `complete` compiles it
    rows = list(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32))
    freqs = generate.row_frequencies(cfg, [prompt] * batch)
    cache = generate.init_cache(cfg, batch, generate.cache_length(prompt + 8 * chunk))
    logits, cache = generate._prefill(net, params, cache, rows, freqs, None)
    state = {"logits": logits, "cache": cache, "key": jax.random.key(0), "done": jnp.zeros(batch, bool),
             "start": prompt}

    def args():
        return (net, params, state["cache"], state["logits"], jnp.full(batch, state["start"], jnp.int32), freqs,
                state["key"], jnp.float32(1.0), state["done"], jnp.int32(-1))

    def run():
        tokens, state["logits"], state["cache"], state["key"], state["done"] = generate.decode_chunk(
            *args(), chunk=chunk, sample=False, mesh=None)
        state["start"] += chunk
        state["tokens"] = tokens

    def hlo():
        return generate.decode_chunk.lower(*args(), chunk=chunk, sample=False, mesh=None).compile().as_text()

    return run, lambda: np.asarray(state["tokens"]), hlo


def _trace(run, finish, calls: int) -> tuple[float, collections.Counter, collections.Counter, collections.Counter,
                                             list]:
    """(wall seconds per call, kernel ns by kind, by name stem, launches by name stem, `kernel_events`) over
    `calls` traced."""
    import jax

    from yarn_jax import cli

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t = time.perf_counter()
        for _ in range(calls):
            run()
        finish()
        wall = (time.perf_counter() - t) / calls
        jax.profiler.stop_trace()
        (xplane,) = Path(d).rglob("*.xplane.pb")
        events = kernel_events(str(xplane))
    if not events:
        raise cli.RunError(f"profile: the trace holds no GPU stream kernels ({jax.devices()[0].platform}: "
                           "profiles need a GPU)")
    by_kind, by_stem, launches = collections.Counter(), collections.Counter(), collections.Counter()
    for _, ns, name in events:
        by_kind[kind(name)] += ns
        by_stem[stem(name)] += ns
        launches[stem(name)] += 1
    return wall, by_kind, by_stem, launches, events


def _parser():
    from yarn_jax import cli

    p = cli.ArgumentParser(prog="python -m yarn_jax.bench profile")
    p.add_argument("--config", default="configs/h200_1b.py")
    p.add_argument("--seq", type=cli.count(1), default=8192, help="tokens per step (--decode: the prompt's length)")
    p.add_argument("--decode", action="store_true", help="profile generation's decode steps, not a train step")
    p.add_argument("--batch", type=cli.count(1), default=1, help="--decode: prompts at once")
    p.add_argument("--steps", type=cli.count(1), default=3, help="steps traced (--decode: decode chunks)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sequence", type=cli.count(0), default=0,
                   help="also print and write this many consecutive kernels from the trace's middle, in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the old spelling of --config.KEY=VALUE (kept for one release)")
    p.add_argument("--hlo", default=None, help="also write the compiled step's HLO text here")
    p.add_argument("--out", default=None, help="JSON results (default bench_results/profile_<seq>.json)")
    return p


def main(argv: list[str]) -> int:
    import jax

    from yarn_jax import generate, run_config

    p = _parser()
    overrides, rest = run_config.split_overrides(argv)
    a = p.parse_args(rest)
    a.set += overrides
    config = run_config.load(a.config, a.set)
    run, finish, hlo = _decode(config, a.seq, a.batch) if a.decode else _train(config, a.seq)
    per_call = generate.DECODE_CHUNK if a.decode else 1  # steps per traced call
    hlo_text = hlo()
    if a.hlo:
        Path(a.hlo).write_text(hlo_text)
    for _ in range(2):
        run()
    finish()
    steps = a.steps * per_call
    wall, by_kind, total, count, events = _trace(run, finish, a.steps)
    wall /= per_call
    ms = lambda ns: ns / steps / 1e6  # noqa: E731  per step
    what = f"decode after {a.seq} tokens, batch {a.batch}" if a.decode else f"seq {a.seq}"
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {what}, {' '.join(a.set)}")
    print(f"step wall time {wall * 1e3:.3f} ms; kernels {ms(sum(total.values())):.3f} ms in "
          f"{sum(count.values()) / steps:.0f} launches")
    print("| kind | ms/step | share of wall |\n|---|---|---|")
    for k, ns in by_kind.most_common():
        print(f"| {k} | {ms(ns):.3f} | {ms(ns) / (wall * 1e3):.1%} |")
    print("\n| kernel (numbering dropped) | kind | calls/step | ms/step |\n|---|---|---|---|")
    top = sorted(total, key=total.get, reverse=True)[:a.top]
    for name in top:
        print(f"| {name[:90]} | {kind(name)} | {count[name] / steps:.0f} | {ms(total[name]):.3f} |")
    order = sequence(events, a.sequence)
    if order:
        print("\n| kernel, in order | us | idle before, us |\n|---|---|---|")
        print("\n".join(f"| {r['kernel'][:90]} | {r['us']:.2f} | {r['gap_us']:.2f} |" for r in order))
    by_op = fusions_by_op(events, hlo_text)
    print("\n| XLA's fusions by the model operation they come from (op_name) | ms/step |\n|---|---|")
    print("\n".join(f"| {op} | {ms(ns):.3f} |" for op, ns in by_op.most_common(a.top)))
    out = Path(a.out or f"bench_results/profile_{'decode_' if a.decode else ''}{a.seq}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                               "date": time.strftime("%Y-%m-%d"),
                               "command": " ".join(["python -m yarn_jax.bench profile", *argv]),
                               "seq": a.seq, "decode": a.decode, "batch": a.batch, "set": a.set,
                               "wall_ms": wall * 1e3, "launches": sum(count.values()) / steps,
                               "kinds_ms": {k: ms(v) for k, v in by_kind.items()},
                               "top": [{"kernel": n, "kind": kind(n), "calls": count[n] / steps,
                                        "ms": ms(total[n])} for n in top],
                               "fusions_by_op": [{"op": op, "ms": ms(ns)} for op, ns in by_op.most_common(a.top)],
                               "sequence": order}, indent=2))
    return 0
