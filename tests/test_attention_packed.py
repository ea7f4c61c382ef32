"""Packed documents on a GPU (`attention.cudnn`): the lengths and first tokens handed to cuDNN's packed
layout, checked on CPU as the mask they describe, and the XLA block fallback for rows of more documents.
The cuDNN kernel itself is checked in `tests/test_attention_gpu.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tolerances import TOL
from yarn_jax import attention
from yarn_jax.attention import cudnn, reference
from yarn_jax.model.execution import Execution

M = cudnn.PACKED_DOCUMENTS


def test_runs_are_the_lengths_and_first_tokens_of_each_rows_documents():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1] * 8, [1, 2, 3, 4, 5, 6, 7, 8]])
    lengths, starts, count = cudnn.runs(seg, 4)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2], [8, -1, -1, -1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(starts, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(count, [4, 1, 8])  # the last row has more documents than the 4 described
    np.testing.assert_array_equal(cudnn.documents(np.asarray(seg)), count)  # the trainer's host-side count


def test_the_trainers_document_count_is_the_steps_on_random_rows():
    seg = _segments(np.random.default_rng(0), 64, [1, 2, 7, 30, 63, 64], padding=True)
    np.testing.assert_array_equal(cudnn.documents(np.asarray(seg)), cudnn.runs(seg, M)[2])
    assert attention.packed_documents_limit(Execution(), None, None) is None  # no cuDNN kernel on this CPU


def test_the_packed_layouts_limit_on_a_gpu_mesh(monkeypatch):
    """What the trainer compares each batch with on a (stand-in) Hopper GPU: 16 documents a row; none with
    a sliding window; no limit in float32 (the reference kernel) or in a ring (its blocks warn themselves)."""
    from types import SimpleNamespace

    monkeypatch.setattr(cudnn, "_hopper", lambda: True)
    mesh = lambda seq: SimpleNamespace(devices=np.array([SimpleNamespace(platform="gpu")]),  # noqa: E731
                                       shape={"seq": seq})
    bf16 = Execution(dtype="bfloat16")
    assert attention.packed_documents_limit(bf16, mesh(1), None) == M
    assert attention.packed_documents_limit(bf16, mesh(1), 4096) == 0
    assert attention.packed_documents_limit(Execution(dtype="float32"), mesh(1), None) is None
    assert attention.packed_documents_limit(bf16, mesh(2), None) is None


def _segments(rng, t: int, docs: list[int], padding: bool) -> jax.Array:
    """[B, T] ids 1, 2, ... in runs of random lengths, `docs[b]` runs in row b (the last one padding, id 0)."""
    rows = []
    for d in docs:
        row = np.zeros(t, np.int32)
        for i, cut in enumerate(np.sort(rng.choice(np.arange(1, t), d - 1, replace=False))):
            row[cut:] = i + 1
        rows.append(np.where((row == d - 1) & padding & (d > 1), -1, row) + 1)
    return jnp.asarray(np.stack(rows))


CASES = {  # documents in each row; padding at the end of each row with more than one; a sliding window
    "one document a row": ([1, 1], False, None),
    "a few, padded": ([3, 5], True, None),
    "exactly the packed layout's bound": ([M, 2], False, None),
    "one row over it: the XLA blocks": ([M + 1, 1], True, None),
    "a few, padded, a sliding window: the XLA blocks": ([3, 5], True, 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_equal_the_reference_forward_and_gradients(case):
    """q, k, v float32, GQA 2: cudnn.attention with implementation='xla' (the packed layout's description as
    an explicit mask, or the XLA blocks past the bound or with a window) against the reference with segment
    ids."""
    docs, padding, window = CASES[case]
    rng = np.random.default_rng(len(docs) + sum(docs))
    b, t = len(docs), 96
    seg = _segments(rng, t, docs, padding)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    keys = jax.random.split(jax.random.key(sum(docs)), 4)
    q, do = (jax.random.normal(keys[i], (b, t, 4, 16)) for i in (0, 3))
    k, v = (jax.random.normal(keys[i], (b, t, 2, 16)) for i in (1, 2))
    got, got_vjp = jax.vjp(jax.jit(lambda q, k, v: cudnn.attention(q, k, v, seg, seg, idx, idx, window=window,
                                                                   implementation="xla")), q, k, v)
    want, want_vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, seg, seg, idx, idx, window=window), q, k, v)
    rtol, atol = TOL[jnp.float32]
    for a, w in zip((got, *got_vjp(do)), (want, *want_vjp(do)), strict=True):
        np.testing.assert_allclose(a, w, rtol=rtol, atol=atol)
    if max(docs) <= M and window is None:  # the description alone, no fallback: a broken length or offset fails
        lengths, starts, _ = cudnn.runs(seg, M)
        np.testing.assert_allclose(cudnn._packed_xla(q, k, v, lengths, starts), want, rtol=rtol, atol=atol)


def test_packed_documents_in_cross_attention_are_refused_in_one_line():
    q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    seg, idx = jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
    with pytest.raises(ValueError, match="packed documents .* in self-attention"):
        cudnn.attention(q, jnp.zeros((1, 16, 2, 16), jnp.bfloat16), jnp.zeros((1, 16, 2, 16), jnp.bfloat16), seg,
                        jnp.ones((1, 16), jnp.int32), idx, jnp.arange(16)[None], implementation="xla")


@pytest.mark.parametrize("remat,docs", [("none", [3, 5]), ("attention", [3, 5]), ("full", [3, M + 2])],
                         ids=["packed-none", "packed-attention", "over-the-bound-full"])
def test_the_loss_and_its_gradients_with_packed_documents_equal_the_reference_kernels(remat, docs, monkeypatch):
    """The packed path inside the model (scanned layers under remat policies; a batch within the bound, and
    one with a row over it, so that the fallback runs inside the scan): loss and parameter gradients equal
    the reference kernel's."""
    import functools

    import yarn_jax
    from yarn_jax import attention
    from yarn_jax.model import loss

    cfg = yarn_jax.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8).with_execution(dtype="float32", remat=remat)
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    seg = _segments(rng, 64, docs, padding=True)
    batch = {"tokens": jnp.asarray(rng.integers(0, 64, (2, 64)), jnp.int32), "segment_ids": seg,
             "positions": jnp.asarray(np.concatenate([np.arange(64)[None]] * 2), jnp.int32)}

    def grads():
        return jax.value_and_grad(lambda p: loss.loss_fn(cfg, None, 16, True, p, batch)[0])(params)

    want = grads()
    select = attention.select
    monkeypatch.setattr(attention, "select", lambda impl, platform=None: functools.partial(
        cudnn.attention, implementation="xla") if impl is cfg.execution.attention else select(impl, platform))
    got = grads()
    rtol, atol = TOL[jnp.float32]
    for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, w, rtol=rtol, atol=atol)
