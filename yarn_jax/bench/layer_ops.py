"""The step's work outside attention and the plain GEMMs, against candidate kernels: SwiGLU (the gate and
up projections with their activation) and RMSNorm, forward and backward, at a run config's shape.

    python -m yarn_jax.bench layer-ops [--config configs/h200_1b.py] [--seq 8192]
                                       [--impl xla,tokamax-mosaic,tokamax-triton]

`xla`: the model's own functions (`llama.swiglu`, `llama.rms_norm`) as XLA compiles them in the step.
`tokamax-<implementation>`: `tokamax.gated_linear_unit` (silu; mosaic, triton or xla) and
`tokamax.layer_norm` without the mean (triton or xla), from PyPI `tokamax` (the `kernels` extra). bf16
inputs [1, T, D] and weights [D, F] of the config's model; each row: fwd and fwd+bwd milliseconds
(`bench.kernel_time`) and the largest difference of the output and the gradients from the same function
in float32, relative to their maxima. A candidate that does not run here is a row with its reason.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from yarn_jax.bench import failure, fwd_bwd, kernel_time, rel_diff, tokamax

IMPLS = {"swiglu": ("xla", "tokamax-mosaic", "tokamax-triton", "tokamax-xla"),
         "rmsnorm": ("xla", "tokamax-triton", "tokamax-xla")}


def op(name: str, impl: str, eps: float):
    """fn(x, w...) for op `name` ('swiglu': x, gate, up; 'rmsnorm': x, scale) by `impl`."""
    import jax

    from yarn_jax.model import llama

    if impl == "xla":
        if name == "swiglu":
            return llama.swiglu
        return lambda x, scale: llama.rms_norm(x, scale, eps, x.dtype)
    kind, module = impl.removeprefix("tokamax-"), tokamax(f"--impl {impl}")
    if name == "swiglu":
        return lambda x, gate, up: module.gated_linear_unit(x, (gate, up), activation=jax.nn.silu,
                                                            implementation=kind)
    return lambda x, scale: module.layer_norm(x, scale, None, subtract_mean=False, epsilon=eps,
                                              implementation=kind)


def _inputs(name: str, t: int, d: int, f: int):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(t), 3)
    x = jax.random.normal(keys[0], (1, t, d), jnp.bfloat16)
    if name == "swiglu":
        return x, *(jax.random.normal(key, (d, f), jnp.bfloat16) * d**-0.5 for key in keys[1:])
    return x, 1.0 + 0.1 * jax.random.normal(keys[1], (d,), jnp.bfloat16)


def row(name: str, impl: str, t: int, d: int, f: int, eps: float) -> dict:
    import jax
    import jax.numpy as jnp

    fn, args = op(name, impl, eps), _inputs(name, t, d, f)
    ref = op(name, "xla", eps)
    try:
        out = jax.jit(fn)(*args)
        cot = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
        got = (out, *jax.jit(fwd_bwd(fn))(*args, cot))
        wide = [a.astype(jnp.float32) for a in (*args, cot)]
        err = rel_diff(got, (ref(*wide[:-1]), *fwd_bwd(ref)(*wide)))
        fwd = kernel_time(jax.jit(fn), *args, calls=10)
        both = kernel_time(jax.jit(fwd_bwd(fn)), *args, cot, calls=10)
    except Exception as e:  # noqa: BLE001  a candidate that does not run here is a finding, not a crash
        return {"op": name, "impl": impl, "seq": t, "error": failure(e)}
    return {"op": name, "impl": impl, "seq": t, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "rel_err": err}


def main(argv: list[str]) -> int:
    from yarn_jax import cli, run_config

    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench layer-ops")
    p.add_argument("--config", default="configs/h200_1b.py", help="the run config whose model shape is timed")
    p.add_argument("--seq", default="8192", type=cli.int_list, help="comma list of token counts")
    p.add_argument("--impl", default=",".join(IMPLS["swiglu"]), help="comma list of xla, tokamax-<implementation>")
    p.add_argument("--out", default="bench_results/layer_ops.json")
    a = p.parse_args(argv)
    impls = a.impl.split(",")
    known = sorted(set(IMPLS["swiglu"]) | set(IMPLS["rmsnorm"]))
    if bad := [i for i in impls if i not in known]:
        raise SystemExit(f"--impl: expected a comma list of {', '.join(known)}, got {bad[0]!r}")
    import jax

    cfg, _ = run_config.model_config(run_config.load(a.config, []))
    shape = functools.partial(row, d=cfg.hidden_size, f=cfg.intermediate_size, eps=cfg.rms_norm_eps)
    rows = [shape(name, impl, t) for t in a.seq for name, valid in IMPLS.items() for impl in impls if impl in valid]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; D {cfg.hidden_size}, "
          f"F {cfg.intermediate_size}, bf16")
    print("| op | impl | seq | fwd ms | fwd+bwd ms | max relative difference to float32 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['impl']} | {r['seq']} | " + (f"{r['error']} | | |" if "error" in r else
              f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['rel_err']:.1e} |"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": a.config, "device": jax.devices()[0].device_kind,
                                       "jax": jax.__version__, "rows": rows}, indent=2))
    return 0
