"""The attention package: ring attention with each block kernel against the single-device reference
(8 fake CPU devices), its layouts, fallbacks and errors, and the kernel choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tolerances import TOL
from yarn_jax import sharding
from yarn_jax.attention import block_cudnn, block_splash, block_xla, reference, ring
from yarn_jax.model.execution import RingLayout, divisor_at_most


def _inputs(seed, b=2, t=64, n=4, k=2, h=8, segments=True):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(1, 4, size=(b, t)), axis=1), jnp.int32) if segments else None
    return q, kk, v, seg


def _ring_and_reference(seg, shape, ring_size, layout, kernel=None, window=None):
    """(ring, reference): attention functions of (q, k, v) in sequence order with segment ids `seg` (None:
    one document per row) and a sliding `window` (None: none); the ring permutes its inputs to `layout`
    over `ring_size` fake devices, runs `kernel` (default: the XLA loop) for its blocks and un-permutes its
    output."""
    b, t = shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    attend = ring.ring_attention(sharding.make_mesh(seq=ring_size, devices=jax.devices()[:ring_size]),
                                 kernel or block_xla.Kernel(), layout)
    perm = ring.permutation(t, ring_size, layout)
    inv = np.argsort(perm)

    def ring_out(q, k, v):
        s, i = (None if seg is None else seg[:, perm]), idx[:, perm]
        return attend(q[:, perm], k[:, perm], v[:, perm], s, s, i, i, window=window)[:, inv]

    return jax.jit(ring_out), lambda q, k, v: reference.attention(q, k, v, seg, seg, idx, idx, window=window)


def _check_vjp(ring_out, ref_out, q, k, v, tol):
    do = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    (got, got_vjp), (want, want_vjp) = jax.vjp(ring_out, q, k, v), jax.vjp(ref_out, q, k, v)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    for a, b_ in zip(got_vjp(do), want_vjp(do), strict=True):
        np.testing.assert_allclose(a, b_, rtol=tol, atol=tol)


# (ring size, (query chunk, kv chunk), packed segments): whole blocks over every ring size; the sub-block
# chunkings (the XLA kernel's own loop, the same at any ring size) over a ring of 4
GRID = [(r, (1024, 512), seg) for r in (2, 4, 8) for seg in (True, False)] + [(4, (4, 2), True), (4, (2, 4), True)]


@pytest.mark.parametrize("ring_size,chunks,segments", GRID,
                         ids=[f"ring{r}-" + {(4, 2): "sub-chunks", (2, 4): "wide-kv"}.get(c, "block" if s else
                                                                                          "block-one-doc")
                              for r, c, s in GRID])
@pytest.mark.parametrize("layout", list(RingLayout))
def test_ring_forward_and_grad_equal_reference(ring_size, layout, chunks, segments, monkeypatch):
    """The XLA block kernel in the ring, GQA (4 query heads, 2 kv heads), float32; packed segments with
    three chunkings of the blocks, one document per row (the fused kernels' case) with whole blocks."""
    monkeypatch.setattr(block_xla, "Q_CHUNK", chunks[0])
    monkeypatch.setattr(block_xla, "KV_CHUNK", chunks[1])
    q, k, v, seg = _inputs(ring_size, segments=segments)
    _check_vjp(*_ring_and_reference(seg, seg.shape if segments else q.shape[:2], ring_size, layout), q, k, v,
               TOL[jnp.float32][0])


@pytest.mark.parametrize("layout,window", [(RingLayout.ZIGZAG, 5), (RingLayout.STRIPED, 20)])
def test_ring_with_a_sliding_window_equals_reference(layout, window, monkeypatch):
    """A window shorter than the blocks (5 tokens; zigzag halves of 8 on a ring of 4) and one spanning
    several (20), with packed segments and chunks of 4 x 2 so that the window hides whole chunk pairs."""
    monkeypatch.setattr(block_xla, "Q_CHUNK", 4)
    monkeypatch.setattr(block_xla, "KV_CHUNK", 2)
    q, k, v, seg = _inputs(window)
    _check_vjp(*_ring_and_reference(seg, seg.shape, 4, layout, window=window), q, k, v, TOL[jnp.float32][0])


def test_xla_blocks_take_as_few_whole_chunks_as_the_bound_allows(monkeypatch):
    """A block length that 1,024 does not divide still gets chunks near the bound (not gcd-sized ones), and
    the ring over such lengths (zigzag halves of 25 tokens, bounds 8 and 16: chunks of 5 x 5, where gcd gave
    1 x 1) equals the reference, forward and gradients."""
    assert [divisor_at_most(n, 1024) for n in (4096, 1000, 3000, 25)] == [1024, 1000, 1000, 25]
    assert divisor_at_most(96, 64) == 48 and divisor_at_most(97, 64) == 1
    monkeypatch.setattr(block_xla, "Q_CHUNK", 8)
    monkeypatch.setattr(block_xla, "KV_CHUNK", 16)
    q, k, v, seg = _inputs(5, t=100)
    _check_vjp(*_ring_and_reference(seg, seg.shape, 2, RingLayout.ZIGZAG), q, k, v, TOL[jnp.float32][0])


@pytest.mark.parametrize("segments", [False, True], ids=["one-doc", "segments"])
@pytest.mark.parametrize("ring_size", [1, 2, 4])
def test_ring_with_splash_blocks_in_interpret_mode_equals_reference(ring_size, segments):
    """Pallas splash (TPU's kernel, here in interpret mode) as the zigzag ring's blocks: float32, GQA."""
    q, k, v, seg = _inputs(ring_size, b=1, t=256 * ring_size, n=2, k=1, h=128, segments=segments)
    ring_out, ref_out = _ring_and_reference(seg, q.shape[:2], ring_size, RingLayout.ZIGZAG,
                                            block_splash.Kernel(interpret=True))
    _check_vjp(ring_out, ref_out, q, k, v, 1e-5)


SPLASH_GRID = [(512, False, None, 128), (512, True, None, 128), (512, False, 100, 128), (512, True, 40, 128),
               (768, False, None, 128),  # three 256 tiles (512 does not divide it)
               (200, True, 40, 64)]  # padded to 256 tokens, with segments and a window; head dim 64 (1B models)


@pytest.mark.parametrize("t,segments,window,h", SPLASH_GRID,
                         ids=[f"{t}-{'segments' if s else 'one-doc'}-window{w}-h{h}" for t, s, w, h in SPLASH_GRID])
def test_splash_single_device_in_interpret_mode_equals_reference(t, segments, window, h):
    """TPU's kernel without a ring (`attention.splash`, Pallas interpret mode): forward and gradients of
    q, k, v against the reference, float32, GQA (4 query heads on 2 kv heads), two rows, packed segments
    and a sliding window shorter than the row (and than the documents); lengths that 512 does not divide
    and one that no tile divides."""
    from yarn_jax.attention import splash

    q, k, v, seg = _inputs(7, b=2, t=t, n=4, k=2, h=h, segments=segments)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    fused = functools.partial(splash.attention, window=window, interpret=True)
    _check_vjp(lambda q, k, v: fused(q, k, v, seg, seg, idx, idx),
               lambda q, k, v: reference.attention(q, k, v, seg, seg, idx, idx, window=window), q, k, v, 1e-5)


def test_ring_in_bfloat16_keeps_the_reference_within_bfloat16_error():
    """bf16 inputs: the ring's matmuls take bf16 operands (p and dS rounded to bf16, as flash kernels do)
    and accumulate in float32. Output and gradients stay within a few bf16 roundings of the float32
    reference computed from the same values (the bf16 result itself is one rounding away)."""
    q, k, v, seg = _inputs(5, t=128, h=16)
    ring_out, ref_out = _ring_and_reference(seg, seg.shape, 4, RingLayout.ZIGZAG)
    do = np.random.default_rng(9).normal(size=q.shape).astype(np.float32)
    q16, k16, v16, do16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, do))
    got, got_vjp = jax.vjp(ring_out, q16, k16, v16)
    want, want_vjp = jax.vjp(ref_out, *(x.astype(jnp.float32) for x in (q16, k16, v16)))  # the same values
    assert got.dtype == jnp.bfloat16
    for name, a, w in zip(("out", "dq", "dk", "dv"), (got, *got_vjp(do16)),
                          (want, *want_vjp(do16.astype(jnp.float32))), strict=True):
        a, w = np.asarray(a, np.float32), np.asarray(w, np.float32)
        rounding = np.abs(np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32) - w).max()
        err = np.abs(a - w).max()
        assert err <= 3 * rounding, (name, err, rounding)  # measured: 1.0-1.5 roundings
        assert err <= 2e-2 * np.abs(w).max(), (name, err, np.abs(w).max())


def test_fused_blocks_that_cannot_take_the_mask_or_dtype_fall_back_to_the_xla_loop_with_one_warning(caplog,
                                                                                                     monkeypatch):
    monkeypatch.setattr(ring, "_warned", set())  # one warning per reason and process: none given yet
    cudnn, splash = block_cudnn.Kernel(), block_splash.Kernel()  # their `supports` need no GPU or TPU
    bf16 = jnp.bfloat16
    assert ring._kernel_for(cudnn, RingLayout.ZIGZAG, None, False, 256, bf16) is cudnn
    assert ring._kernel_for(splash, RingLayout.ZIGZAG, None, False, 256, bf16) is splash
    assert ring._kernel_for(splash, RingLayout.ZIGZAG, None, False, 256, jnp.float32) is splash
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert isinstance(ring._kernel_for(cudnn, RingLayout.ZIGZAG, None, True, 256, bf16), block_xla.Kernel)
        assert isinstance(ring._kernel_for(splash, RingLayout.STRIPED, None, False, 256, bf16), block_xla.Kernel)
        # zigzag halves of 128 tokens: 64-token blocks, which splash's tiles cannot take
        assert isinstance(ring._kernel_for(splash, RingLayout.ZIGZAG, None, False, 128, bf16), block_xla.Kernel)
        # an evaluation in full precision: cuDNN's fused kernel takes float16/bfloat16 only
        assert isinstance(ring._kernel_for(cudnn, RingLayout.ZIGZAG, None, False, 256, jnp.float32), block_xla.Kernel)
        for kernel in (cudnn, splash):  # a sliding window: a distance between token indices
            assert isinstance(ring._kernel_for(kernel, RingLayout.ZIGZAG, 64, False, 256, bf16), block_xla.Kernel)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("segment ids" in x for x in lines) == 1 and sum("striped" in x for x in lines) == 1, lines
    assert any("float16 or bfloat16 only (this is float32)" in x for x in lines), lines
    assert any("multiples of 128 tokens (this ring's blocks have 64)" in x for x in lines), lines
    assert sum("take no sliding window" in x for x in lines) == 2, lines


def test_private_kernels_refuse_jax_versions_they_were_not_written_for(monkeypatch):
    from yarn_jax.attention.block import Mask

    monkeypatch.setattr(jax, "__version__", "0.12.0")
    x = jnp.zeros((1, 8, 1, 8))
    for kernel in (block_cudnn.Kernel(), block_splash.Kernel()):
        with pytest.raises(NotImplementedError, match="written for jax .*this is jax 0.12.0"):
            kernel.forward(x, x, x, Mask(True))


def test_layouts_balance_causal_work():
    t, r = 64, 4
    for layout in RingLayout:
        blocks = ring.permutation(t, r, layout).reshape(r, t // r)
        work = [int(sum(blocks[i].sum() + len(blocks[i]) for _ in [0])) for i in range(r)]  # sum of (index+1)
        assert max(work) - min(work) <= t // r * r, (layout, work)
    zig = ring.permutation(16, 2, RingLayout.ZIGZAG).reshape(2, 8)
    assert zig[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]


def test_ring_errors():
    with pytest.raises(ValueError, match="multiple of 2 x the ring size"):
        ring.permutation(12, 4, RingLayout.ZIGZAG)
    with pytest.raises(ValueError, match="multiple of the ring size"):
        ring.permutation(10, 4, RingLayout.STRIPED)


def test_kernel_platform_mismatch_is_an_error():
    from yarn_jax import attention
    from yarn_jax.model.execution import AttentionImpl

    with pytest.raises(ValueError, match="'cudnn' needs platform 'gpu', but this is 'cpu'"):
        attention.select(AttentionImpl.CUDNN, "cpu")
    with pytest.raises(ValueError, match="'splash' needs platform 'tpu'"):
        attention.select(AttentionImpl.SPLASH, "gpu")
    assert attention.select(AttentionImpl.AUTO, "cpu") is attention.reference.attention


def test_auto_on_gpu_takes_cudnn_for_half_precision_and_the_reference_for_float32(monkeypatch):
    """cuDNN's fused kernel takes float16/bfloat16 only: a float32 evaluation on a GPU (the parity checks)
    runs the reference attention; bfloat16 goes to cuDNN (replaced here by a recorder)."""
    from yarn_jax import attention
    from yarn_jax.model.execution import AttentionImpl

    took = []
    monkeypatch.setattr(attention.cudnn, "attention", lambda q, *a, **k: took.append(q.dtype) or q)
    auto = attention.select(AttentionImpl.AUTO, "gpu")
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 2, 16)) for i in range(3))
    index = jnp.arange(8)[None]
    np.testing.assert_array_equal(auto(q, k, v, None, None, index, index),
                                  reference.attention(q, k, v, None, None, index, index))
    auto(q.astype(jnp.bfloat16), k, v, None, None, index, index)
    assert took == [jnp.bfloat16]


def test_cudnn_chosen_explicitly_refuses_float32_in_one_line():
    """cudnn named in the config with a float32 model: a ValueError naming the kernel and the dtype (the
    command lines print it as one line), raised before any cuDNN call, so it is checked on CPU."""
    from yarn_jax.attention import cudnn

    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    index = jnp.arange(8)[None]
    with pytest.raises(ValueError, match="'cudnn' takes float16 or bfloat16, not float32"):
        cudnn.attention(q, q, q, None, None, index, index)


DECODE_GRID = [  # (batch, queries, heads, kv heads, head dim, cache slots, window, dtype)
    (2, 1, 8, 2, 32, 512, None, jnp.float32),  # GQA 4, one block of the XLA form per 512 slots
    (3, 1, 14, 2, 16, 256, None, jnp.bfloat16),  # GQA 7 (Qwen2-0.5B's): padded to 16 query rows in the kernel
    (1, 3, 4, 4, 32, 1024, 100, jnp.bfloat16),  # MHA, three queries at once, a sliding window
    (2, 2, 16, 2, 32, 512, None, jnp.bfloat16),  # 2 x 8 = 16 query rows: the batch-1 twin rows, no padding rows
]


@pytest.mark.parametrize("form", ["xla", "pallas"])
@pytest.mark.parametrize("b,t,n,kh,h,s,window,dtype", DECODE_GRID)
def test_flash_decoding_equals_the_float32_reference(form, b, t, n, kh, h, s, window, dtype):
    """Queries at fresh random fill levels (from one slot to the whole cache) of a cache in its own
    dtype, read at one of its layers: the XLA form and the GPU kernel (Pallas' interpreter on CPU) equal
    the float32 reference over the filled slots; slots past the fill (junk here) never count."""
    from yarn_jax.attention import decode

    rng = np.random.default_rng(s + t)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(3, b, s, kh, h)) * 2, dtype) for _ in range(2))
    ends = rng.integers(t, s + 1, size=b)
    ends[0] = t  # the first row: only its own queries filled
    q_idx = jnp.asarray(ends[:, None] - t + np.arange(t), jnp.int32)
    kv_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    want = jax.jit(lambda: reference.attention(q, k[1], v[1], None, None, q_idx, kv_idx, window=window))()
    fn = decode.attention_xla if form == "xla" else functools.partial(decode.attention_pallas, interpret=True)
    got = jax.jit(lambda: fn(q, k, v, jnp.int32(1), None, None, q_idx, kv_idx, window=window))()
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("form", ["xla", "pallas"])
def test_flash_decoding_of_a_token_twice_equals_it_once(form):
    """The twin rows of a batch-1 decode step (`Llama.decode`): one token twice at the same index gives
    that token's output on both rows (the kernel packs both into one program's query rows)."""
    from yarn_jax.attention import decode

    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.normal(size=(1, 1, 16, 32)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(2, 1, 512, 2, 32)), jnp.bfloat16) for _ in range(2))
    fn = decode.attention_xla if form == "xla" else functools.partial(decode.attention_pallas, interpret=True)
    once = fn(q, k, v, jnp.int32(1), None, None, jnp.asarray([[300]]), None)
    twice = fn(jnp.tile(q, (1, 2, 1, 1)), k, v, jnp.int32(1), None, None, jnp.asarray([[300, 300]]), None)
    np.testing.assert_array_equal(np.asarray(twice[:, :1], np.float32), np.asarray(once, np.float32))
    np.testing.assert_array_equal(np.asarray(twice[:, 1:], np.float32), np.asarray(once, np.float32))


def test_flash_decoding_parts_fill_the_gpu_with_whole_blocks():
    """Up to 1024 programs (batch rows x kv heads x parts), each part at least two key blocks of a full
    cache, the parts with the new keys' one a power of two (the merge kernel loads them all at once)."""
    from yarn_jax.attention import decode

    assert decode.splits(4, 33024) == 128  # batch 1, 4 kv heads, a 32k cache: 258 blocks
    assert decode.splits(4, 33024, extra=1) == 127  # and the part over the new keys
    assert decode.splits(4, 131328) == 256 and decode.splits(4, 131328, extra=1) == 255  # 128k: the program count
    assert decode.splits(64, 33024) == 16  # batch 16
    assert decode.splits(4, 256) == 1 and decode.splits(2048, 1 << 20) == 1 and decode.splits(4, 256, extra=1) == 1


def test_decode_merge_is_the_softmax_over_all_parts():
    """Splitting the keys anywhere and merging the parts' (out, lse) gives softmax attention over all of
    them; a part that saw nothing (lse = MASK_VALUE) weighs 0."""
    from yarn_jax.attention import decode

    rng = np.random.default_rng(4)
    logits, values = rng.normal(size=(5, 7)) * 3, rng.normal(size=(7, 3))
    want = (np.exp(logits - logits.max(1, keepdims=True)) / np.exp(logits - logits.max(1, keepdims=True))
            .sum(1, keepdims=True)) @ values
    outs, lses = [], []
    for part in (slice(0, 2), slice(2, 2), slice(2, 7)):
        lg = logits[:, part]
        if lg.shape[1] == 0:
            outs.append(np.zeros((5, 3))), lses.append(np.full(5, reference.MASK_VALUE))
            continue
        p = np.exp(lg - lg.max(1, keepdims=True))
        outs.append(p @ values[part] / p.sum(1, keepdims=True))
        lses.append(lg.max(1) + np.log(p.sum(1)))
    got = decode.merge(jnp.asarray(np.stack(outs), jnp.float32), jnp.asarray(np.stack(lses), jnp.float32), axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merge_kernel_equals_merge():
    """The GPU's merge (`merge_pallas`, Pallas' interpreter) of random partials, parts that saw nothing
    (lse = MASK_VALUE) among them, equals `merge`, written in the model's [B, t, K, G, H] layout."""
    from yarn_jax.attention import decode

    rng = np.random.default_rng(9)
    b, kh, p, r, t, g, h = 2, 2, 8, 16, 2, 4, 32  # 8 real rows (t x g) of 16
    outs = jnp.asarray(rng.normal(size=(b, kh, p, r, h)), jnp.float32)
    lses = jnp.asarray(rng.normal(size=(b, kh, p, r)) * 4, jnp.float32).at[:, :, ::3].set(reference.MASK_VALUE)
    got = decode.merge_pallas(outs, lses, t, g, jnp.float32, interpret=True)
    want = decode.merge(outs[:, :, :, :t * g], lses[:, :, :, :t * g], axis=2)  # [B, K, t * G, H]
    want = want.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t,n,kh,h,dtype", [(2, 32, 4, 64, jnp.bfloat16), (1, 8, 2, 128, jnp.float16),
                                            (3, 4, 4, 32, jnp.bfloat16), (1, 64, 4, 64, jnp.bfloat16)])
@pytest.mark.parametrize("writes", [False, True])
def test_flash_decoding_kernel_lowers_to_triton_without_a_gpu(t, n, kh, h, dtype, writes):
    """The kernel as the GPU runs it (not the interpreter), reading the cache or also writing the new keys
    into it (aliased in place): exported for CUDA on this host, Pallas lowers it to Triton IR, so a
    construct its Triton backend does not take fails here rather than on a device. (Triton's own
    compilation to PTX still happens only on a GPU.)"""
    from jax import export

    from yarn_jax.attention import decode

    q = jax.ShapeDtypeStruct((1, t, n, h), dtype)
    cache = jax.ShapeDtypeStruct((2, 1, 1024, kh, h), dtype)
    new = jax.ShapeDtypeStruct((1, 1 if t == 2 else t, kh, h), dtype)  # t = 2: the twin rows, one token written
    index = jax.ShapeDtypeStruct((1, t), jnp.int32)
    layer, slot = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    if writes:
        def fn(q, kn, vn, k, v, layer, slot, q_idx):
            return decode.attention_pallas_write(q, kn, vn, (k, v), layer, slot, None, None, q_idx, None)

        args = (q, new, new, cache, cache, layer, slot, index)
    else:
        def fn(q, k, v, layer, q_idx):
            return decode.attention_pallas(q, k, v, layer, None, None, q_idx, None)

        args = (q, cache, cache, layer, index)
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the kernel and its merge
    assert 'name = "flash_decode"' in text and 'name = "flash_decode_merge"' in text


@pytest.mark.parametrize("b,t,written,n,kh,h,s,window", [
    (1, 2, 1, 16, 2, 32, 512, None),  # the batch-1 twin rows: one token twice, written once
    (3, 1, 1, 14, 2, 16, 256, None),  # rows at their own slots, GQA 7 padded to 16 query rows
    (2, 3, 3, 4, 4, 32, 1024, 100),  # three new tokens at once, a sliding window
])
def test_flash_decoding_kernel_that_writes_the_new_keys_equals_writing_then_reading(b, t, written, n, kh, h, s,
                                                                                    window):
    """The GPU kernel that writes the new keys and values itself (Pallas' interpreter on CPU): the same
    cache as `write` (other layers, rows and slots untouched) and, within bf16 rounding, the same output
    as writing first and reading with the XLA form, at fresh random fill levels, the newest slot included."""
    from yarn_jax.attention import decode

    rng = np.random.default_rng(b * 100 + t)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.bfloat16)
    k_new, v_new = (jnp.asarray(rng.normal(size=(b, written, kh, h)) * 2, jnp.bfloat16) for _ in range(2))
    cache = tuple(jnp.asarray(rng.normal(size=(3, b, s, kh, h)) * 2, jnp.bfloat16) for _ in range(2))
    slot = jnp.asarray(rng.integers(0, s - written, size=b), jnp.int32).at[0].set(0)  # row 0: an empty cache
    q_idx = slot[:, None] + jnp.arange(t, dtype=jnp.int32)
    if t > written:  # twins: every query at the one new token's index
        q_idx = jnp.broadcast_to(slot[:, None], (b, t))
    args = (q, k_new, v_new, cache, jnp.int32(1), slot, None, None, q_idx, None)
    want, want_cache = jax.jit(lambda: decode.writing(decode.attention_xla, whole=False)(*args, window=window))()
    fn = functools.partial(decode.attention_pallas_write, interpret=True, window=window)
    got, got_cache = jax.jit(lambda: fn(*args))()
    for g, w in zip(got_cache, want_cache, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    tol = TOL[jnp.bfloat16]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol[0], atol=tol[1])
