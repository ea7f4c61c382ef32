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
    loss = lambda p, c: jnp.mean(yarn_jax.forward(c, p, tokens) ** 2)  # noqa: E731
    want = jax.grad(loss)(params, cfg)
    for unroll in (2, 4):
        got = jax.grad(loss)(params, cfg.with_execution(scan_unroll=unroll))
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
