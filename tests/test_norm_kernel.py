"""norm_kernel's RMSNorm kernels (Pallas' interpreter on CPU) against the model's formula, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yarn_jax import llama, norm_kernel

EPS = 1e-5


def _case(shape, dtype, seed):
    k = jax.random.split(jax.random.key(seed), 3)
    x = (3 * jax.random.normal(k[0], shape, jnp.float32) + 0.5).astype(dtype)
    scale = 1 + 0.2 * jax.random.normal(k[1], shape[-1:], jnp.float32)
    dy = jax.random.normal(k[2], shape, jnp.float32).astype(dtype)
    return x, scale, dy


def _vjp(fn, x, scale, dy):
    out, pullback = jax.vjp(fn, x, scale)
    return (out, *pullback(dy))


@pytest.mark.parametrize("shape", [(2, 24, 128), (3, 5, 4, 64), (1, 7, 32)])  # rows a forward program: 16, 4, 1
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("loop", [False, True])  # backward programs: one block of rows each; 2-row blocks in a loop
def test_kernels_equal_the_formula_forward_and_backward(shape, dtype, loop, monkeypatch):
    """The forward equals `llama.rms_norm` to its rounding; dx and d(scale) equal the float32 formula's
    autodiff to the dtype's rounding of the inputs (the kernel's backward runs in float32)."""
    if loop:
        monkeypatch.setattr(norm_kernel, "PROGRAMS", 2)
        monkeypatch.setattr(norm_kernel, "BWD_BLOCK", 2 * shape[-1])
    dtype = jnp.dtype(dtype)
    x, scale, dy = _case(shape, dtype, seed=sum(shape))
    assert norm_kernel.supported(x)
    got = jax.jit(lambda *a: _vjp(lambda x, s: norm_kernel.rms_norm(x, s, EPS, dtype, True), *a))(x, scale, dy)
    model = jax.jit(lambda x, s: llama.rms_norm(x, s, EPS, dtype))(x, scale)
    f32 = [a.astype(jnp.float32) for a in (x, dy)]
    want = _vjp(lambda x, s: llama.rms_norm(x, s, EPS, jnp.float32), f32[0], scale, f32[1])
    assert [a.dtype for a in got] == [dtype, dtype, scale.dtype]
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # relative to each output's largest magnitude
    np.testing.assert_allclose(got[0].astype(jnp.float32), model.astype(jnp.float32),
                               atol=tol * float(jnp.max(jnp.abs(model.astype(jnp.float32)))))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=tol * float(jnp.max(jnp.abs(b))), rtol=0)


def test_supported_shapes():
    """Triton's blocks: D a power of two (rows of any count: as many a program as divide it)."""
    assert norm_kernel.supported(jnp.zeros((2, 8, 2048)))
    assert norm_kernel.supported(jnp.zeros((1, 7, 256)))
    assert not norm_kernel.supported(jnp.zeros((2, 8, 3584)))  # Qwen2-7B's width


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_add_kernels_equal_the_formula_forward_and_backward(dtype):
    """add_rms_norm: s = x + a and its norm, forward and backward (the gradients of both inputs carry s's
    own cotangent too) against the float32 formula's autodiff, as above."""
    dtype = jnp.dtype(dtype)
    x, scale, dy = _case((2, 24, 128), dtype, seed=3)
    a, _, ds = _case((2, 24, 128), dtype, seed=4)

    def formula(x, a, s, dt):
        x = x + a
        return x, llama.rms_norm(x, s, EPS, dt)

    def run(fn, x, a, s, ds, dy):
        out, pullback = jax.vjp(fn, x, a, s)
        return (*out, *pullback((ds, dy)))

    got = jax.jit(lambda *v: run(lambda x, a, s: norm_kernel.add_rms_norm(x, a, s, EPS, dtype, True), *v))(
        x, a, scale, ds, dy)
    f32 = [v.astype(jnp.float32) for v in (x, a, ds, dy)]
    want = run(lambda x, a, s: formula(x, a, s, jnp.float32), f32[0], f32[1], scale, f32[2], f32[3])
    assert [v.dtype for v in got] == [dtype] * 4 + [scale.dtype]
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=tol * float(jnp.max(jnp.abs(w))), rtol=0)


@pytest.mark.parametrize("d,dtype", [(2048, jnp.bfloat16), (128, jnp.float32)])
def test_kernels_lower_to_triton_without_a_gpu(d, dtype):
    """Forward and backward of both kernels as the GPU runs them (not the interpreter), exported for CUDA
    on this host: Pallas lowers them to Triton IR, so a construct Triton does not take fails here."""
    from jax import export

    x = jax.ShapeDtypeStruct((2, 64, d), dtype)
    scale = jax.ShapeDtypeStruct((d,), jnp.float32)

    def step(x, a, s):
        def loss(x, a, s):
            t, y = norm_kernel.add_rms_norm(x, a, s, EPS, jnp.bfloat16)
            return jnp.sum(norm_kernel.rms_norm(t, s, EPS, jnp.bfloat16).astype(jnp.float32) * y)
        return jax.grad(loss, argnums=(0, 1, 2))(x, a, s)

    exported = export.export(jax.jit(step), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        x, x, scale)
    text = exported.mlir_module()
    for name in ("rms_norm_fwd", "rms_norm_bwd", "add_rms_norm_fwd", "add_rms_norm_bwd"):
        assert f'name = "{name}"' in text
