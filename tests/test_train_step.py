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
