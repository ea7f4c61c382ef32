"""The paper's two TPU runs compiled for real v4 slices on this CPU host (libtpu), with their figures.

    python -m yarn_jax.bench tpu-aot [--out bench_results/tpu_aot.json]

For configs/v4_64k.py and configs/v4_128k.py: on the slice each docstring names (the smallest v4 slice
that fits with at least 10% HBM headroom) and on a 4x larger one (same recipe, fsdp x4, grad_accum / 4),
prints per-chip memory, FLOPs per step (counted on the traced program, against the analytic count),
and the roofline step time, tokens/s and MFU (see `yarn_jax.aot`). Exits 1 if a docstring slice
does not fit with 10% headroom.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HEADROOM = 0.10
RUNS = (  # (config, topology, overrides)
    ("configs/v4_64k.py", "v4-32", ()),
    ("configs/v4_64k.py", "v4-128", ("mesh.fsdp=8", "train.grad_accum=8")),
    ("configs/v4_128k.py", "v4-32", ()),
    ("configs/v4_128k.py", "v4-128", ("mesh.fsdp=4", "train.grad_accum=16")),
)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench tpu-aot")
    p.add_argument("--out", default="bench_results/tpu_aot.json")
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from yarn_jax import aot, run_config

    rows, ok = [], True
    for config_path, topology, overrides in RUNS:
        figures, lines = aot.report(run_config.load(config_path, list(overrides)), topology)
        print("\n".join([f"## {config_path} on {topology} {' '.join(overrides)}".rstrip(), *lines, ""]))
        if not overrides and figures["headroom"] < HEADROOM:
            ok = False
        rows.append({"config": config_path, "topology": topology, "overrides": list(overrides), **figures})
    print("| config | slice | GiB per chip (state + temp = total / HBM) | headroom | FLOPs/step program / analytic "
          "| roofline s/step | tokens/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        slice_ = " ".join([r["topology"], *r["overrides"]])
        print(f"| {Path(r['config']).stem} | {slice_} | {r['state_gib']:.2f} + {r['temp_gib']:.2f} = "
              f"{r['total_gib']:.2f} / {r['hbm_gib']:.0f} | {r['headroom']:.0%} | {r['flops']:.3e} / "
              f"{r['analytic_flops']:.3e} | {r['step_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    if not ok:
        print(f"error: a config does not fit its docstring slice with {HEADROOM:.0%} headroom")
    return 0 if ok else 1
