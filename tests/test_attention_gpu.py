"""cuDNN as the ring's block kernel, with packed documents, and the flash-decoding kernel, on a GPU (skipped
elsewhere).

    JAX_PLATFORMS=cuda python -m pytest tests/test_attention_gpu.py


Tolerance: what the single-device cuDNN kernel itself meets against the float32 reference on the same
bf16 inputs (its error, per output and gradient, relative to the largest reference value), times 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tolerances import LSE_BF16_ATOL, TOL
from yarn_jax import sharding
from yarn_jax.attention import block_cudnn, block_xla, cudnn, reference, ring
from yarn_jax.attention.block import Mask
from yarn_jax.model.execution import RingLayout

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU with cuDNN")


def _qkv(seed, t, s, n=8, k=2, h=64):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = ((1, t, n, h), (1, s, k, h), (1, s, k, h), (1, t, n, h))
    return tuple(jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(keys, shapes, strict=True))


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _errors(fn, ref, q, k, v, do):
    """Relative errors of fn's output and (dq, dk, dv) against ref's on float32 copies of the inputs."""
    got, vjp = jax.vjp(fn, q, k, v)
    want, ref_vjp = jax.vjp(ref, *(x.astype(jnp.float32) for x in (q, k, v)))
    return [_rel(a, b) for a, b in zip((got, *vjp(do)), (want, *ref_vjp(do.astype(jnp.float32))), strict=True)]


def _idx(t):
    return jnp.arange(t, dtype=jnp.int32)[None]


def _single_device_errors(t=1024):
    q, k, v, do = _qkv(0, t, t)
    return _errors(lambda q, k, v: cudnn.attention(q, k, v, None, None, _idx(t), _idx(t)),
                   lambda q, k, v: reference.attention(q, k, v, None, None, _idx(t), _idx(t)), q, k, v, do)


@pytest.mark.parametrize("causal,t,s", [(True, 1024, 1024), (False, 1024, 512), (False, 512, 1024)])
def test_cudnn_block_forward_and_backward_equal_the_reference(causal, t, s):
    bound = [2 * e + 1e-3 for e in _single_device_errors()]
    q, k, v, do = _qkv(1, t, s)
    mask = Mask(causal)
    out, lse = jax.jit(block_cudnn.forward)(q, k, v, mask)
    want_out, want_lse = block_xla.forward(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    assert _rel(out, want_out) <= bound[0]
    np.testing.assert_allclose(lse, want_lse, atol=LSE_BF16_ATOL)
    grads = jax.jit(block_cudnn.backward)(q, k, v, want_out.astype(q.dtype), want_lse, do, mask)
    want = block_xla.backward(*(x.astype(jnp.float32) for x in (q, k, v, want_out, want_lse, do)), mask)
    for got_g, want_g, b in zip(grads, want, bound[1:], strict=True):
        assert _rel(got_g, want_g) <= b


def test_ring_of_one_with_cudnn_blocks_equals_the_reference():
    t = 2048
    bound = [2 * e + 1e-3 for e in _single_device_errors(t)]
    q, k, v, do = _qkv(2, t, t)
    mesh = sharding.make_mesh(seq=1, devices=jax.devices()[:1])
    attend = ring.ring_attention(mesh, block_cudnn.Kernel(), RingLayout.ZIGZAG)
    errs = _errors(jax.jit(lambda q, k, v: attend(q, k, v, None, None, _idx(t), _idx(t))),
                   lambda q, k, v: reference.attention(q, k, v, None, None, _idx(t), _idx(t)), q, k, v, do)
    assert all(e <= b for e, b in zip(errs, bound, strict=True)), (errs, bound)


@pytest.mark.parametrize("device", [0, 3])
def test_a_ring_devices_work_with_cudnn_blocks_equals_the_xla_blocks(device):
    """Device `device` of a ring of 4 (every branch of the zigzag schedule: causal, all queries x first key
    chunk, second query chunk x all keys), cuDNN blocks against the XLA blocks in float32."""
    t = 1024
    bound = [2 * e + 1e-3 for e in _single_device_errors()]
    q, k, v, do = _qkv(3, t, t)
    got = ring.device_work(block_cudnn.Kernel(), 4, device)
    want = ring.device_work(block_xla.Kernel(), 4, device)
    errs = _errors(jax.jit(got), want, q, k, v, do)
    assert all(e <= b for e, b in zip(errs, bound, strict=True)), (errs, bound)


def test_generation_with_cudnn_prefill_equals_the_reference_kernel():
    """`generate.step` on the GPU with YaRN: a cuDNN prefill of a 300-token prompt (padded to the cache) and
    8 decode steps against the cache, teacher-forced, give the logits of the same bf16 model with the
    reference attention within bf16 tolerance (relative to the largest logit)."""
    import yarn_jax
    from yarn_jax import generate
    from yarn_jax.model import scaling

    cfg = yarn_jax.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=64, max_position_embeddings=1024,
                               rope_scaling=scaling.Yarn(4.0, 256))
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(0)))  # sharper logits
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 308)).astype(np.int32)
    prompt, length = 300, generate.cache_length(308)
    freqs = generate.frequencies(cfg, prompt)

    def logits(impl):
        run = cfg.with_execution(attention=impl)
        cache = generate.init_cache(run, 1, length)
        padded = np.zeros((1, length), np.int32)
        padded[:, :prompt] = seq[:, :prompt]
        out, cache = generate.step(run, params, cache, jnp.asarray(padded), jnp.int32(0), freqs,
                                   jnp.int32(prompt - 1), prefill=True)
        rows = [out]
        for i in range(prompt, seq.shape[1]):
            out, cache = generate.step(run, params, cache, jnp.asarray(seq[:, i:i + 1]), jnp.int32(i), freqs,
                                       prefill=False)
            rows.append(out)
        return np.stack([np.asarray(r, np.float32) for r in rows])

    got, want = logits("cudnn"), logits("reference")
    assert _rel(got, want) <= TOL[jnp.bfloat16][0], _rel(got, want)


@pytest.mark.parametrize("window", [2, 100, 1000])  # 1: dq = dk = 0 exactly, no relative error
def test_cudnn_sliding_window_forward_and_backward_equal_the_reference(window):
    """Mistral's window as cuDNN's local window (the query and window - 1 keys before it), within the bound
    the kernel meets without a window."""
    t = 1024
    bound = [2 * e + 1e-3 for e in _single_device_errors(t)]
    q, k, v, do = _qkv(2, t, t)
    errors = _errors(lambda q, k, v: cudnn.attention(q, k, v, None, None, _idx(t), _idx(t), window=window),
                     lambda q, k, v: reference.attention(q, k, v, None, None, _idx(t), _idx(t), window=window),
                     q, k, v, do)
    assert all(e <= b for e, b in zip(errors, bound, strict=True)), (errors, bound)


def _documents(t: int, lengths: list[int]) -> jax.Array:
    """[1, T] ids 1, 2, ... in runs of `lengths` (the rest of the row padding, id 0)."""
    ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
    return jnp.asarray(np.pad(ids, (0, t - ids.size)))[None]


@pytest.mark.parametrize("lengths", [[1024], [300, 200, 400], [100] * 9 + [23], [64] * cudnn.PACKED_DOCUMENTS,
                                     [60] * (cudnn.PACKED_DOCUMENTS + 1)],
                         ids=["one", "three-padded", "ten", "at-the-bound", "over-the-bound"])
def test_packed_documents_forward_and_backward_equal_the_reference(lengths):
    """cuDNN's packed layout (every row within PACKED_DOCUMENTS documents) and the XLA blocks past it, against
    the reference with the same segment ids, within the bound the kernel meets with one document."""
    t = 1024
    bound = [2 * e + 1e-3 for e in _single_device_errors(t)]
    q, k, v, do = _qkv(3, t, t)
    seg = _documents(t, lengths)
    errors = _errors(jax.jit(lambda q, k, v: cudnn.attention(q, k, v, seg, seg, _idx(t), _idx(t))),
                     lambda q, k, v: reference.attention(q, k, v, seg, seg, _idx(t), _idx(t)), q, k, v, do)
    assert all(e <= b for e, b in zip(errors, bound, strict=True)), (errors, bound)


@pytest.mark.parametrize("t,n,k,h,window", [(1, 32, 4, 64, None), (2, 32, 4, 64, None), (1, 14, 2, 128, 1000),
                                             (1, 32, 32, 128, None)],
                         ids=["tinyllama", "tinyllama-two-tokens", "qwen2-window", "llama2-mha"])
def test_flash_decoding_kernel_equals_the_float32_reference(t, n, k, h, window):
    """The Triton kernel (compiled, not interpreted) on a bf16 cache of 8,448 slots read at layer 2 of 3,
    rows filled to t, 5,000 and 8,448 slots (t new tokens each; two tokens x 8 heads: the unpadded layout):
    within bf16 tolerance of the float32 reference over the filled slots, and equal to the XLA form's
    result within the same."""
    from yarn_jax.attention import decode

    b, s = 3, 8448
    keys = jax.random.split(jax.random.key(k + h + t), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    kk, v = (jax.random.normal(key, (3, b, s, k, h), jnp.bfloat16) for key in keys[1:])
    q_idx = jnp.asarray([[0], [5000 - t], [s - t]], jnp.int32) + jnp.arange(t, dtype=jnp.int32)
    kv_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    want = reference.attention(q, kk[2], v[2], None, None, q_idx, kv_idx, window=window)
    args = (q, kk, v, jnp.int32(2), None, None, q_idx, kv_idx)
    got = jax.jit(lambda *a: decode.attention_pallas(*a, window=window))(*args)
    xla = jax.jit(lambda *a: decode.attention_xla(*a, window=window))(*args)
    rtol, atol = TOL[jnp.bfloat16]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(xla, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("b,t,written", [(1, 2, 1), (3, 1, 1), (2, 3, 3)], ids=["twin", "rows", "three"])
def test_flash_decoding_kernel_that_writes_equals_writing_then_reading(b, t, written):
    """The compiled kernel that writes the new keys and values in place (the cache donated, as in the
    decode loop): the cache equal to `write`'s, the output within bf16 tolerance of writing first and
    reading with the XLA form, on an 8,448-slot cache with rows at fresh fill levels."""
    from yarn_jax.attention import decode

    s, n, k, h = 8448, 32, 4, 64
    keys = jax.random.split(jax.random.key(b + t), 5)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    k_new, v_new = (jax.random.normal(key, (b, written, k, h), jnp.bfloat16) for key in keys[1:3])
    cache = tuple(jax.random.normal(key, (3, b, s, k, h), jnp.bfloat16) for key in keys[3:])
    slot = jnp.asarray([0, 5000, s - written][:b], jnp.int32)
    q_idx = slot[:, None] + (jnp.zeros((1, t), jnp.int32) if t > written else jnp.arange(t, dtype=jnp.int32))
    rest = (jnp.int32(2), slot, None, None, q_idx, None)
    want, want_cache = jax.jit(lambda c: decode.writing(decode.attention_xla, whole=False)(
        q, k_new, v_new, c, *rest))(cache)
    got, got_cache = jax.jit(lambda c: decode.attention_pallas_write(q, k_new, v_new, c, *rest),
                             donate_argnums=0)(tuple(jnp.copy(c) for c in cache))
    for g, w in zip(got_cache, want_cache, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    rtol, atol = TOL[jnp.bfloat16]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=atol)
