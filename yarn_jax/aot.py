"""Compile the exact train step for a real TPU topology on a CPU host and say whether it fits.

    python -m yarn_jax.aot --config configs/v4_128k.py --topology v4-128 [--num-slices 1] [--config.KEY=VALUE]

libtpu + jax.experimental.topologies give the topology's devices without any TPU; the full step (forward,
backward, AdamW update, with the config's model, sequence length, batch, accumulation, remat and mesh)
is lowered and compiled for them. Prints per-chip memory (parameters + optimizer state, temporaries,
total) against HBM, the step's FLOPs against the analytic count, and a roofline step time and MFU.
Exit status 1 when it does not fit, naming the part that is too big and what to change.

FLOPs: XLA's cost analysis counts every loop body once (layers, gradient accumulation and ring steps are
loops), so the step's FLOPs are counted on the traced program instead (`program_flops`): matmul FLOPs
with loops times their trip counts, shard_map bodies times their devices, Pallas kernels times their
grid, conditionals at their costliest branch; the striped ring's conditionals (its chunk-pair skips) are
then scaled by the fraction of pairs that run (`step_flops`). Splash's own block skipping is not modelled.
The roofline step time is that count over the chips' peak (compute only: a lower bound).
MFU convention: model FLOPs = (6N + 6 L d S) per token (causal attention, remat recompute not counted),
over the chips' peak bf16 FLOP/s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.sharding import Mesh

from yarn_jax import cli, hlo, run_config, sharding, train_step
from yarn_jax.attention import ring
from yarn_jax.hardware import Chip, parse_topology
from yarn_jax.model.config import LlamaConfig
from yarn_jax.model.execution import Remat


def topology_devices(name: str, num_slices: int = 1) -> tuple[Chip, int, list[Any]]:
    from jax.experimental import topologies

    chip, chips, topo = parse_topology(name)
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        # libtpu first initialises for this host, which has no TPU: without these it logs a page of errors
        # (no accelerator type, no worker hostnames, no metadata server) that say nothing about the compile
        for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", name),
                           ("TPU_WORKER_HOSTNAMES", "localhost")):
            os.environ.setdefault(key, value)
    # v4/v5p run megacore (one JAX device per chip, its two TensorCores fused), as on real slices
    # a slice smaller than one host (v5e-1, v6e-1) must say so: libtpu's default host is 2x2x1 chips
    host = {"chips_per_host_bounds": [1, 1, 1]} if chips == 1 else {}
    desc = topologies.get_topology_desc(topology_name=topo, platform="tpu", num_slices=num_slices,
                                        chip_config_name="megacore" if chip.cores_in_name else "default", **host)
    return chip, chips * num_slices, list(desc.devices)


def program_flops(jaxpr: jax.extend.core.Jaxpr) -> tuple[float, float]:
    """(matmul FLOPs of a traced program, the part inside conditionals); see the module docstring."""
    total = conditional = 0.0
    for eqn in jaxpr.eqns:
        name, n, sub = eqn.primitive.name, 1.0, []
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        elif name == "cond":
            branch = max(program_flops(b.jaxpr)[0] for b in eqn.params["branches"])
            total, conditional = total + branch, conditional + branch
        elif name == "while":
            raise ValueError("program_flops: a while loop has no static trip count")
        else:
            if name == "scan":
                n, sub = eqn.params["length"], [eqn.params["jaxpr"]]
            elif name == "shard_map":  # the body sees one device's block
                mesh = eqn.params["mesh"]
                n, sub = math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"]), [eqn.params["jaxpr"]]
            elif name == "pallas_call":
                n, sub = math.prod(eqn.params["grid_mapping"].grid), [eqn.params["jaxpr"]]
            else:  # jit, remat, custom_jvp/vjp calls, ...: their sub-programs run once
                sub = [x for v in eqn.params.values() for x in (v if isinstance(v, tuple | list) else (v,))]
            for x in sub:
                if isinstance(x, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    t, c = program_flops(x.jaxpr if isinstance(x, jax.extend.core.ClosedJaxpr) else x)
                    total, conditional = total + n * t, conditional + n * c
    return total, conditional


def trace_step(config: Any, mesh: Mesh):
    """(model config, optimizer, the traced train step) for `config` on `mesh` (abstract inputs only:
    nothing is allocated) to `.lower().compile()`."""
    from yarn_jax.run_config import model_config

    cfg, _ = model_config(config)
    step = train_step.build(config, cfg, mesh)
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), jnp.int32,
                                     sharding=step.batch_sharding) for k in ("tokens", "positions", "segment_ids")}
    return cfg, step.tx, step.fn.trace(step.abstract, batch, jax.ShapeDtypeStruct((), jnp.float32))


def program_bytes(compiled: Any) -> int:
    """Device memory a compiled program needs (per device): arguments + temporaries + outputs - donated."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def step_flops(config: Any, mesh: Mesh, cfg: LlamaConfig, traced: Any) -> dict[str, float]:
    """FLOPs per step: `flops` (the traced program's, the ring's skipped chunk pairs taken out),
    `flops_upper` (every conditional branch run) and `analytic_flops` ((6N + 6LdS) per token, x 4/3 with
    remat: one more forward)."""
    upper, conditional = program_flops(traced.jaxpr.jaxpr)
    ring_size = sharding.ring_size(mesh)
    # the step's conditionals: in the zigzag ring, its choice between two equal-cost blocks (always run);
    # in the striped ring, the XLA block kernel's chunk-pair skips, run for the visible pairs. Kernels' own
    # skips (splash's causal blocks, the XLA kernel's inside the zigzag ring's diagonal) are counted whole.
    visible = ring.visible_fraction(config.data.seq_len, ring_size, cfg.execution.ring_layout) if ring_size > 1 else 1.0
    recompute = 1.0 + (1 / 3 if cfg.execution.remat is not Remat.NONE else 0.0)
    model = config.data.batch_size * config.data.seq_len * train_step.flops_per_token(cfg, config.data.seq_len)
    return {"flops": upper - (1.0 - visible) * conditional, "flops_upper": upper, "visible": visible,
            "model_flops": model, "analytic_flops": model * recompute}


def report(config: Any, topology: str, num_slices: int = 1) -> tuple[dict[str, float], list[str]]:
    """(figures, lines to print). Memory is per chip (devices of a chip summed), FLOPs per step."""
    chip, chips, devices = topology_devices(topology, num_slices)
    mesh = sharding.MeshShape.of(config.mesh).build(devices)
    try:
        cfg, _, traced = trace_step(config, mesh)
        compiled = traced.lower().compile()
    except Exception as e:  # noqa: BLE001  XLA refuses steps far over HBM while compiling
        first = str(e).splitlines()[0][:300]
        if "RESOURCE_EXHAUSTED" not in first:  # config errors (ValueError) and other failures pass through
            raise
        raise DoesNotFitError(f"{topology}: {first}; "
                         f"{advice({'state_gib': 0.0, 'hbm_gib': chip.hbm_bytes / 2**30})}") from None
    per_chip = len(devices) // chips
    mem = compiled.memory_analysis()
    state = mem.argument_size_in_bytes * per_chip
    temp = mem.temp_size_in_bytes * per_chip
    total = program_bytes(compiled) * per_chip
    fl = step_flops(config, mesh, cfg, traced)
    flops = fl["flops"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", 0.0)) * len(devices)  # per-device module x devices, loops once
    tokens = config.data.batch_size * config.data.seq_len
    step_s = flops / (chip.peak_flops * chips)  # compute-bound roofline (XLA's byte count also counts loops once)
    loops = hlo.ring_loop_kernels(compiled.as_text())
    fused = sum(1 for kernels in loops if kernels)
    host = mem.host_temp_size_in_bytes * per_chip  # remat 'offload': the layer inputs in the host's memory
    figures = {"chips": chips, "devices": len(devices), "state_gib": state / 2**30, "temp_gib": temp / 2**30,
               "host_gib": host / 2**30,
               "ring_loops": len(loops), "ring_loops_fused": fused,
               "total_gib": total / 2**30, "hbm_gib": chip.hbm_bytes / 2**30,
               "headroom": 1 - total / chip.hbm_bytes, **fl, "xla_flops": xla_flops,
               "step_s": step_s, "mfu": fl["model_flops"] / (step_s * chip.peak_flops * chips),
               "tokens_per_s": tokens / step_s}
    lines = [
        f"{topology} ({chips} chips, {len(devices)} devices, mesh {dict(mesh.shape)}): {cfg.num_params():,} "
        f"parameters, {config.data.batch_size} x {config.data.seq_len} tokens per step, grad_accum "
        f"{config.train.grad_accum}, remat {cfg.execution.remat.value}",
        "| per chip | GiB |", "|---|---|",
        f"| parameters + optimizer state (arguments) | {figures['state_gib']:.2f} |",
        f"| activations / temporaries | {figures['temp_gib']:.2f} |",
        f"| total (arguments + temporaries + outputs - donated) | {figures['total_gib']:.2f} |",
        f"| HBM | {figures['hbm_gib']:.0f} ({figures['total_gib'] / figures['hbm_gib']:.0%} used) |",
        *([f"| host memory (offloaded layer inputs, not in HBM) | {figures['host_gib']:.2f} |"] if host else []),
        f"FLOPs per step: program {flops:.3e} ("
        + (f"{fl['visible']:.0%} of ring chunk pairs run; " if sharding.ring_size(mesh) > 1 else "")
        + f"every branch: {fl['flops_upper']:.3e}), analytic (6N + 6LdS) x "
        f"{fl['analytic_flops'] / fl['model_flops']:.2f} remat = {fl['analytic_flops']:.3e} (ratio "
        f"{flops / fl['analytic_flops']:.2f}); XLA cost analysis {xla_flops:.3e} (loop bodies once)",
        *([f"ring: {len(loops)} loops in the compiled step, {fused} with "
           f"fused block kernels inside ({', '.join(sorted({k for c in loops for k in c})) or 'none'})"]
          if loops else []),
        f"roofline: {step_s:.2f} s/step, {figures['tokens_per_s']:,.0f} tokens/s for the slice, MFU "
        f"{figures['mfu']:.1%} (6N + 6LdS per token over {chip.peak_flops / 1e12:.0f} TFLOP/s per chip)",
    ]
    return figures, lines


def generation_report(config: Any, topology: str, new_tokens: int = 64) -> tuple[dict[str, float], list[str]]:
    """The passkey / generation steps of `config`'s model for `topology`, compiled: one prompt of
    data.seq_len tokens (batch 1) prefilled with ring attention into a bf16 KV cache split over the mesh's
    seq axis, then one decode step (`generate.step`, as `generate` runs them), parameters in bf16.
    (figures, lines): per-chip memory of each program and the fit verdict."""
    from yarn_jax import generate
    from yarn_jax.model.llama import Cache, init_params, param_shardings
    from yarn_jax.run_config import model_config

    chip, chips, devices = topology_devices(topology)
    mesh = sharding.MeshShape.of(config.mesh).build(devices)
    cfg, _ = model_config(config)
    cfg = cfg.with_execution(dtype="bfloat16", param_dtype="bfloat16", remat="none")
    t0 = config.data.seq_len
    length = generate.cache_length(t0 + new_tokens, sharding.ring_size(mesh))
    sharding.check_batch(mesh, 1, length)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), param_shardings(cfg, mesh))
    kv = sharding.logical_sharding(mesh, ("layers", "batch", "seq", "kv_heads", "head_dim"))
    shape = (cfg.num_layers, 1, length, cfg.num_kv_heads, cfg.head_dim)
    cache = Cache(*(jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=kv),) * 2)
    freqs = generate.frequencies(cfg, t0)
    per_chip, rows = len(devices) // chips, {}
    for name, t in (("prefill", length), ("decode", 1)):
        tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
        compiled = generate.step.lower(cfg, params, cache, tokens, jnp.int32(0), freqs, jnp.int32(t0 - 1),
                                       prefill=name == "prefill", mesh=mesh).compile()
        rows[name] = program_bytes(compiled) * per_chip / 2**30
    cache_gib = 2 * math.prod(shape) * 2 / chips / 2**30
    worst = max(rows.values())
    figures = {"prefill_gib": rows["prefill"], "decode_gib": rows["decode"], "cache_gib": cache_gib,
               "hbm_gib": chip.hbm_bytes / 2**30, "headroom": 1 - worst * 2**30 / chip.hbm_bytes}
    lines = [f"{topology} ({chips} chips, mesh {dict(mesh.shape)}): generation from a {t0:,}-token prompt, "
             f"cache of {length:,} slots, {cfg.num_params():,} bf16 parameters",
             "| per chip | GiB |", "|---|---|",
             f"| KV cache (bf16, split over seq) | {cache_gib:.2f} |",
             f"| prefill program (parameters + cache + temporaries) | {rows['prefill']:.2f} |",
             f"| decode step program | {rows['decode']:.2f} |",
             f"| HBM | {figures['hbm_gib']:.0f} |"]
    return figures, lines


class DoesNotFitError(ValueError):
    """The step needs more memory than the chips have."""


def advice(figures: dict[str, float]) -> str:
    if figures["state_gib"] > 0.6 * figures["hbm_gib"]:
        return ("parameters + optimizer state are too big for this slice: shard them over more chips (a larger "
                "fsdp axis or slice) or keep parameters in bfloat16 (model.param_dtype)")
    return ("activations are too big: use a larger ring (mesh.seq), more gradient accumulation (smaller "
            "micro-batches), remat='full' or 'offload' (the layer inputs in host memory), or a smaller "
            "train.loss_chunk")


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m yarn_jax.aot", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/<name>.py")
    p.add_argument("--topology", required=True, help="e.g. v4-8 .. v4-512, v5e-16, v5p-64, v6e-32")
    p.add_argument("--num-slices", type=cli.count(1), default=1, help="multislice: slices of the topology")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the old spelling of --config.KEY=VALUE (kept for one release)")
    p.add_argument("--generate", action="store_true",
                   help="compile the passkey / generation steps instead (a data.seq_len prompt, batch 1)")
    overrides, rest = run_config.split_overrides(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a compile for a topology runs on this host's CPU
    return cli.run(lambda: _run(p.parse_args(rest), overrides))


def _run(a, overrides: list[str]) -> int:
    overrides = a.set + overrides
    if a.generate:
        figures, lines = generation_report(run_config.load(a.config, overrides), a.topology)
        print("\n".join(lines))
        if figures["headroom"] < 0:
            print(f"DOES NOT FIT: {(1 - figures['headroom']) * figures['hbm_gib']:.1f} GiB per chip > "
                  f"{figures['hbm_gib']:.0f} GiB HBM; use a larger ring (mesh.seq)", file=sys.stderr)
            return 1
        print(f"fits with {figures['headroom']:.0%} HBM headroom")
        return 0
    try:
        figures, lines = report(run_config.load(a.config, overrides), a.topology, a.num_slices)
    except DoesNotFitError as e:
        print(f"DOES NOT FIT: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    if figures["total_gib"] > figures["hbm_gib"]:
        print(f"DOES NOT FIT: {figures['total_gib']:.1f} GiB per chip > {figures['hbm_gib']:.0f} GiB HBM; "
              f"{advice(figures)}", file=sys.stderr)
        return 1
    print(f"fits with {figures['headroom']:.0%} HBM headroom")
    return 0


if __name__ == "__main__":
    sys.exit(main())

