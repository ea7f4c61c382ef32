"""Benchmarks: `python -m yarn_jax.bench <name> ...`; each prints a table and writes it under bench_results/."""

from __future__ import annotations

import statistics
import time


def kernel_time(fn, *args, calls: int) -> float:
    """Seconds per call of `fn`, issued `calls` times back to back (no host round trip between calls, as
    inside a step), median of 3 such batches after a compile + warm-up call."""
    import jax

    jax.block_until_ready(fn(*args))
    batches = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(calls)])
        batches.append((time.perf_counter() - t) / calls)
    return statistics.median(batches)


def fwd_bwd(fn):
    """(*args, cotangent) -> the gradients of args: forward and backward of `fn(*args)` (an attention
    `attend(q, k, v)` gives (q, k, v, do) -> (dq, dk, dv))."""
    import jax

    return lambda *args: jax.vjp(fn, *args[:-1])[1](args[-1])


def rel_diff(got, want) -> float:
    """The largest |got - want| over pairs of arrays, each relative to its want's largest magnitude."""
    import jax.numpy as jnp

    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
               for g, w in zip(got, want, strict=True))


def failure(e: BaseException) -> str:
    """A candidate kernel's failure as one line: its type and first line (an ExceptionGroup, as tokamax
    raises with one exception per implementation tried, by its first)."""
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e).strip() else '(no message)'}"[:300]


def tokamax(option: str):
    """The `tokamax` package (candidate kernels; the `kernels` extra), or a one-line error naming `option`.
    Its options are absl flags, which it would otherwise parse from our argv; its failed implementations
    log tracebacks, silenced here (a bench reports them as one line or one row)."""
    import logging

    try:
        import tokamax as module
    except ImportError as e:
        raise SystemExit(f"{option} needs tokamax (pip install -e '.[kernels]'): {e}") from None
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    return module
