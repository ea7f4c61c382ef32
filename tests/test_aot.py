"""Compiled for real TPU topologies on this CPU host through libtpu: `python -m yarn_jax.aot`, the model's
gradient with splash and the ring, the generation steps. One file, so that one test process at a time holds
libtpu's machine-wide lock (pytest-xdist's `--dist loadfile` keeps a file on one worker)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import yarn_jax
from tests.train_helpers import ROOT
from yarn_jax import aot, attention, hlo, run_config, sharding
from yarn_jax.attention import block_xla, ring
from yarn_jax.model.execution import AttentionImpl, RingLayout

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")


def test_topology_names():
    assert aot.parse_topology("v4-8")[1:] == (4, "v4:2x2x1")
    assert aot.parse_topology("v4-128")[1:] == (64, "v4:4x4x4")
    assert aot.parse_topology("v5e-16")[1:] == (16, "v5e:4x4")
    assert aot.parse_topology("v6e-256")[1:] == (256, "v6e:16x16")
    with pytest.raises(ValueError, match="--topology: expected one of"):
        aot.parse_topology("h100-8")
    with pytest.raises(ValueError, match="is not a v4 slice this tool knows"):
        aot.parse_topology("v4-12")


def test_tiny_config_compiles_and_fits_on_v4_8(capsys):
    rc = aot.main(["--config", str(ROOT / "configs/tiny.py"), "--topology", "v4-8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "v4-8 (4 chips, 4 devices" in out and "fits with" in out and "FLOPs per step: program" in out


def test_config_that_cannot_fit_fails_with_a_clear_message(capsys):
    # 8 Llama-2-7B-wide layers at 32k tokens per chip, no remat, no ring: activations cannot fit 32 GiB
    # (71 GiB of temporaries; compiles in ~8 s, where 128k tokens took 80 s)
    rc = aot.main(["--config", str(ROOT / "configs/v4_128k.py"), "--topology", "v4-8",
                   "--set", "model.remat=none", "--set", "model.num_layers=8", "--set", "mesh.seq=1",
                   "--set", "mesh.fsdp=4", "--set", "data.batch_size=4", "--set", "data.seq_len=32768",
                   "--set", "train.grad_accum=1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "DOES NOT FIT" in err and "activations are too big" in err and "mesh.seq" in err and "'offload'" in err


def test_a_one_chip_slice_has_one_device():
    # libtpu's default host is 2x2x1 chips: v6e-1 failed with "not divisible by chips_per_host_bounds"
    for name in ("v5e-1", "v6e-1"):
        assert len(aot.topology_devices(name)[2]) == 1


def test_optimizer_moments_are_sharded_like_their_parameters_on_tpu():
    # the compiler's own choice for tx.init's outputs was "replicated" on TPU topologies: 12 bytes per
    # parameter on every chip instead of 12 / fsdp
    from yarn_jax import train_step
    from yarn_jax.run_config import model_config

    config = run_config.load(str(ROOT / "configs/tiny.py"), ["mesh.fsdp=4", "mesh.seq=1", "mesh.data=1"])
    _, _, devices = aot.topology_devices("v4-8")
    mesh = sharding.make_mesh(**config.mesh, devices=devices)
    cfg, _ = model_config(config)
    tx = train_step.optimizer(train_step.OptimConfig(**{**config.optim.to_dict(), "total_steps": 10}))
    abstract, _ = train_step.state_shardings(cfg, mesh, tx)
    adam = abstract.opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        assert all(jax.tree.leaves(jax.tree.map(lambda m, p: m.sharding == p.sharding, moments, abstract.params)))
    assert abstract.params["embedding"].sharding.spec != ()


def test_ring_inside_a_layer_scan_stays_linear_in_memory():
    # JAX hoisted the masks (computed from layer-invariant ids) out of the scan over layers, all chunks at
    # once and broadcast over heads: 7.9 / 30.3 GiB at 16k / 32k here instead of 0.77 / 1.46 (bf16 matmul
    # operands; 0.88 / 1.57 with float32 ones). At 8k each device holds one query chunk, so 16k is the
    # first size where doubling the tokens doubles the per-device work.
    _, _, devices = aot.topology_devices("v4-16")
    mesh = sharding.make_mesh(seq=8, devices=devices)
    attend = ring.ring_attention(mesh, attention.block_kernel(AttentionImpl.AUTO, "tpu"), RingLayout.ZIGZAG)
    spec = NamedSharding(mesh, P(("data", "fsdp"), "seq", "tensor", None))

    def temp_gib(t):
        x = jax.ShapeDtypeStruct((1, t, 32, 128), jnp.bfloat16, sharding=spec)
        idx = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), "seq")))

        def loss(q, k, v, i):
            out, _ = jax.lax.scan(lambda c, _: (attend(c, k, v, None, None, i, i), None), q, None, length=2)
            return out.astype(jnp.float32).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, idx).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**30

    small, big = temp_gib(16384), temp_gib(32768)
    assert big < 2.5 * small and big < 2.5, (small, big)


def test_program_flops_counts_loops_devices_and_conditionals():
    mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])

    def per_device(x, w):  # x [2, 16], w [16, 32] on each device
        def body(c, _):
            y = jax.lax.cond(c.sum() > 0, lambda: x @ w, lambda: jnp.zeros((2, 32)))  # 2*2*16*32 in a cond
            return c + (x @ w).sum(), y  # and once outside
        return jax.lax.scan(body, jnp.float32(0), None, length=3)[1]

    f = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P()), out_specs=P(None, "data"), check_vma=False)
    jaxpr = jax.make_jaxpr(f)(jnp.ones((8, 16)), jnp.ones((16, 32))).jaxpr
    one = 2 * 2 * 16 * 32
    assert aot.program_flops(jaxpr) == (4 * 3 * 2 * one, 4 * 3 * one)


def test_visible_fraction_matches_the_mask(monkeypatch):
    assert ring.visible_fraction(65536, 8, RingLayout.ZIGZAG) == 1.0  # its schedule computes visible blocks only
    assert 0.5 < ring.visible_fraction(65536, 8, RingLayout.STRIPED) < 0.6  # causal: half, plus the diagonal
    monkeypatch.setattr(block_xla, "Q_CHUNK", 4)
    monkeypatch.setattr(block_xla, "KV_CHUNK", 2)
    blocks = ring.permutation(64, 4, RingLayout.STRIPED).reshape(4, 16)
    pairs = [(q[:, None] >= k[None, :]).any() for d in range(4) for s in range(4)
             for q in blocks[d].reshape(4, 4) for k in blocks[s].reshape(8, 2)]
    assert ring.visible_fraction(64, 4, RingLayout.STRIPED) == np.mean(pairs)


@pytest.mark.parametrize("name,topology", [("v4_64k", "v4-32"), ("v4_128k", "v4-32")])
def test_paper_configs_step_flops_agree_with_the_analytic_count(name, topology):
    config = run_config.load(str(ROOT / f"configs/{name}.py"), [])
    mesh = sharding.make_mesh(**config.mesh, devices=aot.topology_devices(topology)[2])
    cfg, _, traced = aot.trace_step(config, mesh)
    fl = aot.step_flops(config, mesh, cfg, traced)
    assert 0.85 < fl["flops"] / fl["analytic_flops"] < 1.15, fl


def test_generation_steps_compile_with_the_cache_split_over_seq(capsys):
    rc = aot.main(["--config", str(ROOT / "configs/tiny.py"), "--topology", "v4-8", "--generate",
                   "--config.mesh.seq=4", "--config.data.seq_len=1024"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "mesh {'data': 1, 'fsdp': 1, 'seq': 4, 'tensor': 1}" in out and "KV cache (bf16, split over seq)" in out
    assert "prefill program" in out and "decode step program" in out and "fits with" in out


def test_generation_steps_compile_on_one_chip_with_a_cache_512_does_not_divide(capsys):
    """Without a ring the prefill runs splash over the whole cache: a 512-token prompt and 64 new tokens
    make 768 slots, which splash's 512-token tiles refused before it took 256-token ones."""
    rc = aot.main(["--config", str(ROOT / "configs/tiny.py"), "--topology", "v5e-1", "--generate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "cache of 768 slots" in out and "fits with" in out


def test_offload_moves_the_layer_inputs_to_host_memory():
    """Remat 'offload' on a TPU topology: the compiled step holds the layers' saved inputs in host memory
    ([L, B, T, D] on each chip: 4 layers x 2 rows x 4096 x 128 float32 = 16 MiB on a v4-8 with fsdp 4),
    and its HBM temporaries fall by at least that much against remat 'full' (at 4096 tokens; at 2048 the
    transfers' staging buffers outweigh what moves)."""
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs/tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures, lines = {}, {}
    for remat in ("full", "offload"):
        config = module.get_config()
        config.model.remat, config.data.seq_len = remat, 4096
        figures[remat], lines[remat] = aot.report(config, "v4-8")
    full, offload = figures["full"], figures["offload"]
    assert full["host_gib"] == 0 and not any("host memory" in line for line in lines["full"])
    assert offload["host_gib"] * 2**30 == 4 * 2 * 4096 * 128 * 4
    assert "| host memory (offloaded layer inputs, not in HBM) | 0.02 |" in lines["offload"]
    assert offload["temp_gib"] <= full["temp_gib"] - offload["host_gib"], (full, offload)


@pytest.mark.parametrize("mesh_shape,attention", [((1, 4, 1, 1), "splash"), ((1, 1, 4, 1), "auto")])
def test_train_gradient_compiles_for_tpu_v4(mesh_shape, attention):
    cfg = yarn_jax.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=64, rope_scaling=yarn_jax.model.scaling.Yarn(4.0, 256),
                               execution=yarn_jax.Execution(attention=attention, remat="full"))
    mesh = Mesh(np.asarray(aot.topology_devices("v4-8")[2][: int(np.prod(mesh_shape))]).reshape(mesh_shape),
                sharding.AXES)
    p_shard = yarn_jax.model.llama.param_shardings(cfg, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(lambda: yarn_jax.init_params(cfg, jax.random.key(0))), p_shard)
    tokens = jax.ShapeDtypeStruct((4, 2048), jnp.int32, sharding=sharding.batch_sharding(mesh))
    segments = jax.ShapeDtypeStruct((4, 2048), jnp.int32, sharding=sharding.batch_sharding(mesh))

    def loss(p, t, s):
        return -jnp.mean(jax.nn.log_softmax(yarn_jax.forward(cfg, p, t, segment_ids=s, mesh=mesh))[..., 0])

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens, segments).compile()
    text = compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    if attention == "splash":
        assert "splash" in text or "tpu_custom_call" in text
    if mesh_shape[2] > 1:  # K/V travel around the ring, every ring loop running splash blocks
        assert "collective-permute" in text
        loops = hlo.ring_loop_kernels(text)  # a ring of 2 has one step after its first: no loop is left
        assert (loops or mesh_shape[2] == 2) and all(kernels["tpu_custom_call"] > 0 for kernels in loops), loops


def test_splash_with_a_window_and_a_length_no_tile_divides_compiles_for_tpu_v4():
    """TPU's single-device kernel where its interpret-mode tests cannot reach: the local-window mask and a
    1,000-token row (padded to 1,024 and cut to 128-token tiles), forward and gradient, bf16, GQA, compiled
    by libtpu into Mosaic custom calls."""
    from yarn_jax.attention import splash

    device = aot.topology_devices("v4-8")[2][0]
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    idx = jnp.arange(1000)[None]

    def loss(q, k, v, seg):
        return splash.attention(q, k, v, seg, seg, idx, idx, window=300).astype(jnp.float32).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        spec(1, 1000, 8, 128), spec(1, 1000, 2, 128), spec(1, 1000, 2, 128), spec(1, 1000, dtype=jnp.int32)).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 2  # the forward and the backward kernels
