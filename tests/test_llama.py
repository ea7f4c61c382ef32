"""The Flax LLaMA against transformers' LlamaForCausalLM on tiny random models (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import yarn_jax
from tests import hf_models
from tests.tolerances import GRAD_REORDER_RTOL, HF_LOGITS_ATOL, RECOMPUTE_GRAD_ATOL, REORDER_ATOL

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
CASES = {
    "mha-default": dict(heads=4, kv_heads=4),
    "gqa-yarn": dict(heads=4, kv_heads=2, rope_scaling=YARN),
    "gqa-tied-yarn": dict(heads=4, kv_heads=1, tied=True, rope_scaling=YARN),
    "mha-tied-default": dict(heads=2, kv_heads=2, tied=True),
    "head-dim-yarn-notrunc": dict(heads=4, kv_heads=2, head_dim=32, hidden=48,
                                  rope_scaling={**YARN, "truncate": False, "beta_fast": 16.0}),
    "dynamic": dict(heads=4, kv_heads=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_pos=32),
    "llama3": dict(heads=4, kv_heads=2, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 32}),
}


def _close_grads(a, b):
    np.testing.assert_allclose(a, b, rtol=GRAD_REORDER_RTOL, atol=RECOMPUTE_GRAD_ATOL)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    model = hf_models.hf_model(hf_models.hf_config(max_pos=CASES[case].pop("max_pos", 128), **CASES[case]))
    cfg, params = hf_models.ours(model)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 96))  # past original_max_position (32)
    np.testing.assert_allclose(yarn_jax.forward(cfg, params, tokens), hf_models.hf_logits(model, tokens),
                               atol=HF_LOGITS_ATOL, rtol=0)


def test_explicit_positions_match_transformers():
    model = hf_models.hf_model(hf_models.hf_config(rope_scaling=YARN, max_pos=128))
    cfg, params = hf_models.ours(model)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 40))
    positions = np.sort(rng.choice(400, (2, 40), replace=False), axis=1)
    want = hf_models.hf_logits(model, tokens, position_ids=__import__("torch").as_tensor(positions))
    np.testing.assert_allclose(yarn_jax.forward(cfg, params, tokens, positions), want, atol=HF_LOGITS_ATOL, rtol=0)


def test_packed_documents_equal_separate_runs():
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=YARN).to_dict(), dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(2)
    lengths = [17, 40, 7]
    docs = [rng.integers(0, cfg.vocab_size, (1, n)) for n in lengths]
    tokens = np.concatenate(docs, axis=1)
    segment_ids = np.concatenate([np.full((1, n), i + 1) for i, n in enumerate(lengths)], axis=1)
    positions = np.concatenate([np.arange(n)[None] for n in lengths], axis=1)
    packed = yarn_jax.forward(cfg, params, tokens, positions, segment_ids)
    separate = np.concatenate([yarn_jax.forward(cfg, params, d) for d in docs], axis=1)
    np.testing.assert_allclose(packed, separate, atol=REORDER_ATOL, rtol=0)


def test_bf16_compute_stays_close_to_float32():
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=YARN).to_dict(), dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64))
    f32 = yarn_jax.forward(cfg, params, tokens)
    bf16 = yarn_jax.forward(cfg.with_execution(dtype=jnp.bfloat16), params, tokens)
    assert bf16.dtype == jnp.float32
    assert float(jnp.abs(bf16 - f32).max()) < 0.05 * float(jnp.abs(f32).max())


@pytest.mark.parametrize("remat", list(yarn_jax.Remat))
def test_remat_policies_do_not_change_gradients(remat):
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=YARN).to_dict(), dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)))

    def loss(p, c):
        return jnp.mean(yarn_jax.forward(c, p, tokens) ** 2)

    want = jax.grad(loss)(params, cfg)
    got = jax.grad(loss)(params, cfg.with_execution(remat=remat))
    jax.tree.map(_close_grads, got, want)


def test_unrolled_layers_compute_the_same_gradients_and_refuse_remat():
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(layers=4, rope_scaling=YARN).to_dict(), dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 32)))
    grads = jax.jit(jax.grad(lambda p, c: jnp.mean(yarn_jax.forward(c, p, tokens) ** 2)), static_argnums=1)
    want = grads(params, cfg)
    for unroll in (2, 4):
        got = grads(params, cfg.with_execution(scan_unroll=unroll))
        jax.tree.map(_close_grads, got, want)
    with pytest.raises(ValueError, match="scan_unroll: 4 unrolls all 4 layers.*remat 'none'"):
        cfg.with_execution(scan_unroll=4, remat="full")
    one_layer = cfg.replace(num_layers=1).with_execution(remat="full")
    assert one_layer.execution.scan_unroll == 1  # the default stays valid for one layer


def test_remat_offload_keeps_the_layer_inputs_in_host_memory():
    """What the backward keeps: with 'full' the stacked layer inputs [L, B, T, D] in device memory, with
    'offload' the same array in host memory (pinned_host) and nothing else changed."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(layers=3, rope_scaling=YARN).to_dict(),
                                       dtype="bfloat16", param_dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 32)))

    def kept(remat):  # the arrays the backward keeps that are not arguments, as "dtype<memory>[shape]"
        c = cfg.with_execution(remat=remat)
        res = saved_residuals(lambda p: jnp.sum(yarn_jax.forward(c, p, tokens).astype(jnp.float32)), params)
        return sorted(a.str_short() for a, why in res if "argument" not in why)

    full, offload = kept("full"), kept("offload")
    inputs = f"bfloat16[{cfg.num_layers},1,32,{cfg.hidden_size}]"
    assert inputs in full and inputs not in offload
    assert sorted(s.replace("<host>", "") for s in offload) == full
    assert [s for s in offload if "<host>" in s] == [inputs.replace("[", "<host>[", 1)]


@pytest.mark.parametrize("contract", [1, 2])
def test_cast_dot_is_autodiffs_arithmetic_without_keeping_the_cast(contract):
    """`projection.cast_dot` (a float32 weight cast to bf16 inside the product) gives autodiff's forward and
    gradients bit for bit, on fresh random inputs; autodiff keeps the bf16 copy of the weight for the
    backward, it keeps only its arguments."""
    from jax._src.ad_checkpoint import saved_residuals

    from yarn_jax.model import projection

    kx, kw, kg = jax.random.split(jax.random.key(contract), 3)
    w = jax.random.normal(kw, (4, 6, 10) if contract == 2 else (24, 3, 5), jnp.float32)  # K = 24, F = 10 or 15
    x = jax.random.normal(kx, (2, 8, 24), jnp.bfloat16)
    g = jax.random.normal(kg, (2, 8, w.size // 24), jnp.bfloat16)

    def autodiff(x, w):
        return jnp.einsum("...K,KF->...F", x, w.reshape(24, -1).astype(x.dtype))

    def ours(x, w):
        return projection.cast_dot(x, w, contract)

    (want, want_vjp), (got, got_vjp) = jax.vjp(autodiff, x, w), jax.vjp(ours, x, w)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(got_vjp(g), want_vjp(g), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    def kept(f):  # what the backward keeps that is not an argument
        res = saved_residuals(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), x, w)
        return [a.str_short() for a, why in res if "argument" not in why]

    assert kept(autodiff) == [f"bfloat16[24,{w.size // 24}]"] and kept(ours) == []


def test_without_remat_the_backward_keeps_the_float32_weights_not_bf16_copies():
    """bf16 compute over float32 masters without remat: no layer weight is kept in bf16 for the backward
    (2 bytes a parameter); under `dots` the projections' outputs are still kept (a plain dot it can see)."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(layers=3, rope_scaling=YARN).to_dict(),
                                       dtype="bfloat16", param_dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 32)))
    weights = {a.shape for a in jax.tree.leaves(params["layers"]) if a.ndim > 2}  # [L, *matrix]

    def kept(remat):  # (arrays the backward keeps that are not arguments, the arguments it keeps)
        c = cfg.with_execution(remat=remat)
        res = saved_residuals(lambda p: jnp.sum(yarn_jax.forward(c, p, tokens).astype(jnp.float32)), params)
        return [a for a, why in res if "argument" not in why], [a for a, why in res if "argument" in why]

    own, args = kept("none")
    assert weights and not weights & {a.shape for a in own}
    assert weights <= {a.shape for a in args if a.dtype == jnp.float32}
    dots, _ = kept("dots")
    assert sum(a.shape[-1] == cfg.intermediate_size for a in dots) >= 2  # gate and up outputs
