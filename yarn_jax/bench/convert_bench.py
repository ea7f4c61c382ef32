"""Converts a 7B-shaped random checkpoint both ways and reports seconds and peak RSS per direction.

    python -m yarn_jax.bench convert [--preset llama2_7b] [--dtype bfloat16] [--workdir /tmp/yarn_convert_bench]

The HF directory is written with our streaming writer (random bf16 bits, 5GB shards). Each direction runs
`python -m yarn_jax.convert` in a child process; its peak RSS is the child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from yarn_jax import convert
from yarn_jax.io import hf_files, hf_layout
from yarn_jax.model import config as config_lib
from yarn_jax.model.execution import DTYPES


def write_random_hf(cfg: config_lib.LlamaConfig, out: Path, dtype: np.dtype, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    specs = [(name, t.hf_shape, dtype) for t in hf_layout.layout(cfg) for name in hf_layout.names_of(t, cfg)]

    def arrays():
        for _, shape, dt in specs:  # random low-magnitude values: sign, 6 exponent bits, full mantissa
            bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16) & np.uint16(0b1011_1111_1111_1111)
            yield bits.view(dt) if np.dtype(dt).itemsize == 2 else bits.astype(dt)

    out.mkdir(parents=True)
    hf_files.write_weights(out, specs, arrays(), hf_files.parse_size("5GB"))
    convert.write_hf_metadata(out, cfg, dtype, None)


def _status_kib(pid: int) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("RssAnon", "RssFile")}


def _run(args: list[str]) -> tuple[float, float, float, float]:
    """(seconds, peak RSS, peak anonymous RSS, peak file-backed RSS) of one conversion child, in GiB.

    Peak RSS is the child's own ru_maxrss (os.wait4); the split is sampled from /proc every 0.2 s.
    File-backed pages (memory-mapped safetensors and scratch files) are page cache the kernel can
    reclaim under pressure; anonymous memory is what the conversion really needs.
    """
    start = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}  # no accelerator needed
    child = subprocess.Popen([sys.executable, "-m", "yarn_jax.convert", *args], env=env)
    anon = file = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        sample = _status_kib(child.pid)
        anon, file = max(anon, sample.get("RssAnon", 0)), max(file, sample.get("RssFile", 0))
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"conversion {args[0]} failed with exit status {child.returncode}")
    return seconds, usage.ru_maxrss / 2**20, anon / 2**20, file / 2**20


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench convert")
    p.add_argument("--preset", default="llama2_7b", choices=sorted(config_lib.PRESETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--workdir", default="/tmp/yarn_convert_bench")
    p.add_argument("--out", default="bench_results/convert.json")
    a = p.parse_args(argv)
    cfg = config_lib.PRESETS[a.preset]()
    dtype = np.dtype(DTYPES[a.dtype])
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    write_random_hf(cfg, work / "hf", dtype)
    largest = max(np.prod(((cfg.num_layers,) if t.per_layer else ()) + t.shape) for t in hf_layout.layout(cfg))
    largest_gib = float(largest) * dtype.itemsize / 2**30
    from_hf = _run(["from-hf", str(work / "hf"), str(work / "ckpt")])
    to_hf = _run(["to-hf", str(work / "ckpt"), str(work / "back")])
    identical = all(
        np.array_equal(np.asarray(a_), np.asarray(b_)) for a_, b_ in
        ((convert.hf_files.HfWeights(work / "hf").get(n), convert.hf_files.HfWeights(work / "back").get(n))
         for n in ["model.embed_tokens.weight", "model.layers.17.mlp.down_proj.weight", "lm_head.weight"]))
    rows = [("from-hf", *from_hf), ("to-hf", *to_hf)]
    size_gib = cfg.num_params() * dtype.itemsize / 2**30
    print(f"{a.preset} {a.dtype}: {cfg.num_params():,} parameters, {size_gib:.1f} GiB; largest stacked tensor "
          f"{largest_gib:.2f} GiB; {platform.node()} ({__import__('os').cpu_count()} cores)")
    print("| direction | seconds | peak RSS GiB | peak anonymous GiB | peak file-backed GiB | "
          "anonymous beyond largest tensor GiB |")
    print("|---|---|---|---|---|---|")
    for name, s, rss, anon, file in rows:
        print(f"| {name} | {s:.0f} | {rss:.2f} | {anon:.2f} | {file:.2f} | {anon - largest_gib:.2f} |")
    print(f"sampled tensors bit-identical after the round trip: {identical}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": a.preset, "dtype": a.dtype, "largest_tensor_gib": largest_gib,
                               "rows": [dict(direction=n, seconds=s, peak_rss_gib=r, peak_anon_gib=an, peak_file_gib=f)
                                        for n, s, r, an, f in rows],
                               "identical": identical}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1
