"""The FP8 projections (`model.fp8`): each operand rounded through e4m3 and the gradient through e5m2
with per-tensor scales, against a numpy oracle; a short training run follows the bf16 loss curve."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import yarn_jax
from tests import hf_models
from yarn_jax import train_step
from yarn_jax.model.projection import fp8_dot


def rounded(x: np.ndarray, dtype) -> np.ndarray:
    """x through `dtype` with one scale (amax onto the format's largest finite value), in float32."""
    scale = np.float32(np.abs(x).max() / float(ml_dtypes.finfo(dtype).max))
    return (x / scale).astype(dtype).astype(np.float32) * scale


def test_fp8_dot_and_its_gradients_equal_the_rounded_float32_products():
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32) * m for s, m in (((24, 64), 3.0), ((64, 40), 0.02),
                                                                          ((24, 40), 1e-3)))
    out, vjp = jax.vjp(fp8_dot, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    e4m3, e5m2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
    x8, w8, g8 = rounded(x, e4m3), rounded(w, e4m3), rounded(g, e5m2)
    np.testing.assert_allclose(out, x8 @ w8, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, g8 @ w8.T, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dw, x8.T @ g8, rtol=1e-5, atol=1e-7)
    rel = np.linalg.norm(np.asarray(out) - x @ w) / np.linalg.norm(x @ w)
    assert 1e-3 < rel < 0.05, rel  # rounded (not the float32 product), within e4m3's few percent


def test_fp8_gemms_write_bf16_so_remat_dots_keeps_bf16():
    """bf16 activations: each FP8 GEMM writes bf16 (rounded once more by the scale: two bf16 ulps of
    the oracle) and remat `dots` keeps those bf16 outputs, not float32 ones (which ran the Llama-2-7B
    step at 8k out of memory on one H200)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 64)).astype(ml_dtypes.bfloat16)
    w = (rng.standard_normal((64, 48)) * 0.02).astype(np.float32)
    out = fp8_dot(jnp.asarray(x), jnp.asarray(w))
    assert out.dtype == jnp.bfloat16
    e4m3 = ml_dtypes.float8_e4m3fn
    want = rounded(x.astype(np.float32), e4m3) @ rounded(w, e4m3)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2 ** -7, atol=1e-6 * np.abs(want).max())
    from jax._src.ad_checkpoint import saved_residuals  # no public name in jax 0.10-0.11

    two = jax.checkpoint(lambda x, w: fp8_dot(fp8_dot(x, w), w.T).sum(),
                         policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    kept = [v for v, _ in saved_residuals(two, jnp.asarray(x), jnp.asarray(w))]
    assert any(v.shape == (32, 48) and v.dtype == jnp.bfloat16 for v in kept), kept
    assert not any(v.shape == (32, 48) and v.dtype == jnp.float32 for v in kept), kept


def test_fp8_is_a_boolean_execution_setting():
    with pytest.raises(ValueError, match=r"fp8: expected true or false, got 'yes'"):
        yarn_jax.LlamaConfig.from_hf(hf_models.hf_config().to_dict(), fp8="yes")


def test_fp8_training_follows_the_bf16_loss_curve():
    """30 AdamW steps on one fixed batch (a 2-layer model memorising it), both runs in one compiled
    program: the FP8 run's losses stay within 5% of the bf16 run's, while both fall by more than half."""
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 32)), jnp.int32)
    batch = {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (4, 32)),
             "segment_ids": jnp.ones((4, 32), jnp.int32)}
    tx = optax.adamw(3e-3)
    cfgs = [yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(max_pos=64).to_dict(), dtype="bfloat16", fp8=fp8)
            for fp8 in (False, True)]
    steps = [train_step.make_step(c, None, tx, grad_accum=1, loss_chunk=32, segment_mask=False) for c in cfgs]

    @jax.jit
    def both(states):
        out = [step(state, batch, jnp.float32(1.0)) for step, state in zip(steps, states, strict=True)]
        return [state for state, _ in out], jnp.stack([metrics["loss"] for _, metrics in out])

    params = yarn_jax.init_params(cfgs[0], jax.random.key(0))
    states, losses = [train_step.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))] * 2, []
    for _ in range(30):
        states, loss = both(states)
        losses.append(np.asarray(loss))
    bf16, fp8 = np.asarray(losses).T
    assert bf16[-1] < 0.5 * bf16[0] and fp8[-1] < 0.5 * fp8[0], (bf16, fp8)
    np.testing.assert_allclose(fp8, bf16, rtol=0.05)
