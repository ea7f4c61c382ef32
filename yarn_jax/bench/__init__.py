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


def fwd_bwd(attend):
    """(q, k, v, do) -> (dq, dk, dv): forward and backward of the attention function `attend(q, k, v)`."""
    import jax

    return lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do)
