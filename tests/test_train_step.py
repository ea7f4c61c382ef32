"""The trainer's step (chunked loss, custom logits backward, accumulation) against plain autodiff of the
full-logits loss, on fresh random inputs, in float32 and in bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import yarn_jax
from tests import hf_models
from tests.tolerances import TOL
from yarn_jax import train_step
from yarn_jax.attention import reference

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def capture_grads() -> optax.GradientTransformation:
    """An 'optimizer' whose state becomes the gradients it is given (and which leaves parameters alone)."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def reference_loss(cfg, params, tokens, positions, segment_ids, packed):
    """Mean next-token NLL over pairs inside one segment, from [B, T, V] logits (plain autodiff throughout,
    the unembedding included; the reference attention kernel)."""
    hidden = yarn_jax.hidden_states(cfg, params, tokens, positions, segment_ids if packed else None,
                                    attend=reference.attention)  # [B, T, D]
    w = params["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]  # [D, V]
    logits = jnp.einsum("BTD,DV->BTV", hidden, w.astype(cfg.execution.dtype), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    w = (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)
    return -jnp.sum(picked * w) / jnp.sum(w)


GPU = jax.default_backend() == "gpu"  # the step then uses cuDNN attention: bf16 only, no packed segments
CASES = {  # grad_accum, loss_chunk, tied, remat, scan_unroll (the model has 2 layers), packed
    "accum1-attention": (1, 16, False, "attention", 1, not GPU),
    "accum2-tied-full": (2, 8, True, "full", 1, not GPU),
    "accum4-unrolled": (4, 32, False, "none", 2, False),
}


@pytest.mark.parametrize("case,dtype", [("accum1-attention", "float32"), ("accum1-attention", "bfloat16"),
                                        ("accum2-tied-full", "float32"), ("accum4-unrolled", "bfloat16")])
def test_step_loss_and_grads_equal_plain_autodiff(dtype, case):
    """Run on CPU by the suite (reference attention); on a GPU (JAX_PLATFORMS=cuda) the step uses cuDNN."""
    if GPU and dtype == "float32":
        pytest.skip("cuDNN attention takes bf16/fp16")
    grad_accum, loss_chunk, tied, remat, unroll, packed = CASES[case]
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=YARN, max_pos=64, tied=tied).to_dict(),
                                       dtype=dtype, remat=remat, scan_unroll=unroll)
    rng = np.random.default_rng(grad_accum)
    params = yarn_jax.init_params(cfg, jax.random.key(grad_accum))
    b, t = 4, 32
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    segment_ids = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(t)[None]] * 2 + [(np.arange(t) % 11)[None]] * 2), jnp.int32)
    tx = capture_grads()
    step = jax.jit(train_step.make_step(cfg, None, tx, grad_accum=grad_accum, loss_chunk=loss_chunk,
                                        segment_mask=packed))
    state = train_step.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    new, metrics = step(state, {"tokens": tokens, "positions": positions, "segment_ids": segment_ids},
                        jnp.float32(1.0))

    args = (params, tokens, positions, segment_ids, packed)
    want_loss, want = jax.value_and_grad(reference_loss, argnums=1)(cfg.with_execution(dtype=jnp.float32), *args)
    # bf16 compute: within bf16 tolerance of the float32 gradients and within twice the error of plain autodiff
    # of the same bf16 model, per tensor (the logits backward in bf16 adds its rounding)
    _, plain = jax.value_and_grad(reference_loss, argnums=1)(cfg.with_execution(remat="none", scan_unroll=1), *args)
    rel = lambda a, b_: float(jnp.linalg.norm(a - b_) / jnp.linalg.norm(b_))  # noqa: E731
    rtol, _ = TOL[jnp.dtype(dtype).type]
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=rtol, atol=0)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(want), rtol=rtol)
    for (path, got), ref, bf in zip(jax.tree_util.tree_leaves_with_path(new.opt_state), jax.tree.leaves(want),
                                    jax.tree.leaves(plain), strict=True):
        bound = rtol if dtype == "float32" else min(rtol, 2 * rel(bf, ref))
        assert rel(got, ref) < bound, f"{jax.tree_util.keystr(path)}: relative error {rel(got, ref):.2e} >= {bound:.2e}"


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_loss_gradient_taken_in_its_forward_pass_equals_autodiff(param_dtype):
    """`loss._nll` (each chunk's gradient computed in the forward pass) against autodiff of the same NLL
    from full float32 logits: value, both gradients, the unembedding's gradient in its own dtype, and the
    undifferentiated value equal to the differentiated one."""
    from yarn_jax.model import loss

    rng = np.random.default_rng(7)
    b, t, d, v, chunk = 2, 16, 8, 50, 4
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.5, param_dtype)
    tgt = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.float32)  # some positions without a target

    def plain(h, w_):
        logits = jnp.einsum("BTD,DV->BTV", h, w_.astype(h.dtype), preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], axis=-1)[..., 0]
        return -jnp.sum(picked * weights)

    fused = lambda h, w_: 3.0 * loss._nll(h, w_, tgt, weights, chunk)  # noqa: E731  (a cotangent other than 1)
    want, (want_h, want_w) = jax.value_and_grad(lambda h, w_: 3.0 * plain(h, w_), argnums=(0, 1))(hidden, w)
    got, (got_h, got_w) = jax.value_and_grad(fused, argnums=(0, 1))(hidden, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(fused)(hidden, w), want, rtol=1e-5)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-4, atol=1e-5)
    assert got_w.dtype == w.dtype
    tol = 1e-4 if param_dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(got_w, np.float32), np.asarray(want_w, np.float32), rtol=tol, atol=tol)


def test_flops_per_token_counts_the_keys_a_sliding_window_leaves():
    """The attention term of the MFU formula follows the pairs the mask leaves visible: with a window of 40
    over 256 tokens, the ratio to plain causal equals the ratio of visible (query, key) pairs (to 1%);
    a window that covers the sequence changes nothing."""
    s, w = 256, 40
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=YARN, max_pos=s, family="mistral").to_dict())
    attention = lambda c: train_step.flops_per_token(c, s) - 6.0 * c.num_params()  # noqa: E731
    idx = jnp.arange(s)[None]
    pairs = lambda window: int(reference.mask(None, None, idx, idx, window).sum())  # noqa: E731
    np.testing.assert_allclose(attention(cfg.replace(sliding_window=w)) / attention(cfg), pairs(w) / pairs(None),
                               rtol=1e-2)
    assert train_step.flops_per_token(cfg.replace(sliding_window=s), s) == train_step.flops_per_token(cfg, s)
