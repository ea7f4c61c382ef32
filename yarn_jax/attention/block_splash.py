"""Pallas splash attention as a ring block kernel (TPU; on CPU in Pallas interpret mode, for tests).

Written for jax 0.10, whose `jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel`
provides the forward with `save_residuals=True` (output and the log-sum-exp, natural log) and the backward
`_splash_attention_bwd` (private), which takes the residuals (q, k, v, segment ids, sinks, out, lse, mask
infos) as arguments: the ring passes the global out and lse. Other jax versions are refused with a clear
message. GQA: one MQA kernel per kv head (vmapped), its G query heads sharing that head's K/V. Masks: all
pairs or causal (positional), with or without segment ids; explicit token indices (striped layout) and
sliding windows are not taken. q is scaled by 1/sqrt(H) before the kernel, so its lse is that of the scaled logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from yarn_jax.attention.block import Mask, UnsupportedJaxError

SUPPORTED_JAX = ("0.10.",)


def _lib():
    if not jax.__version__.startswith(SUPPORTED_JAX):
        raise UnsupportedJaxError(f"attention: the splash ring blocks are written for jax {' / '.join(SUPPORTED_JAX)}x "
                                  f"(private splash backward), this is jax {jax.__version__}; use "
                                  "model.attention='reference' for the portable XLA blocks")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    return kernel_lib, mask_lib


class Kernel:
    """Splash as a `block.BlockKernel`; `interpret` runs it in Pallas interpret mode (CPU tests)."""

    name = "splash"

    def __init__(self, interpret: bool = False):
        self.interpret = interpret

    def supports(self, mask: Mask, block: int, dtype: DTypeLike) -> str | None:
        if mask.window is not None:
            return "splash blocks take no sliding window (it depends on where a block lies)"
        if mask.q_index is not None:
            return "splash blocks take positional masks only (not the striped layout)"
        if block % 128:  # the kernel's key tiles are whole multiples of 128 tokens
            return f"splash blocks need multiples of 128 tokens (this ring's blocks have {block})"
        return None

    def _kernel(self, t: int, s: int, g: int, causal: bool):
        kernel_lib, mask_lib = _lib()
        from yarn_jax.attention.splash import tile

        bq, bkv = tile(t), tile(s)
        # the fused backward: dq, dk, dv from one pass over the blocks (5 matmuls per block pair; the separate
        # dq and dkv kernels recompute the scores and dP twice: 8)
        sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                      block_kv_dkv=bkv, block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True)
        one = mask_lib.CausalMask((t, s)) if causal else mask_lib.FullMask((t, s))
        return kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([one] * g), block_sizes=sizes,
                                                        save_residuals=True, interpret=self.interpret)

    def _per_head(self, fn, q, k, v, mask: Mask, *rest):
        """fn(kernel, q1 [G, T, H], k1 [S, H], v1 [S, H], segments, *rest_1) vmapped over batch and kv heads;
        q [B, T, N, H] -> [B, K, G, T, H]; `rest` are [B, N, T(, H)] arrays, regrouped the same way."""
        kernel_lib, _ = _lib()
        b, t, n, h = q.shape
        s, kh = k.shape[1], k.shape[2]
        g = n // kh
        kernel = self._kernel(t, s, g, mask.causal)
        qg = (q * h**-0.5).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
        rest = [x.reshape(b, kh, g, *x.shape[2:]) for x in rest]  # [B, K, G, T, ...]

        def one(q1, k1, v1, q_seg, kv_seg, *xs):
            segments = None if q_seg is None else kernel_lib.SegmentIds(q_seg, kv_seg)
            return fn(kernel, q1, k1, v1, segments, *xs)

        axes = (0, 0, 0, None, None) + (0,) * len(rest)
        over_heads = jax.vmap(one, in_axes=axes)
        return jax.vmap(over_heads)(qg, kt, vt, mask.q_segment_ids, mask.kv_segment_ids, *rest)

    def forward(self, q, k, v, mask: Mask):
        b, t, n, h = q.shape
        out, lse = self._per_head(lambda kern, q1, k1, v1, seg: _unpack(kern(q1, k1, v1, segment_ids=seg)),
                                  q, k, v, mask)  # [B, K, G, T, H], [B, K, G, T]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h), lse.reshape(b, n, t).astype(jnp.float32)

    def backward(self, q, k, v, out, lse, d_out, mask: Mask):
        kernel_lib, _ = _lib()
        b, t, n, h = q.shape

        def grads(kern, q1, k1, v1, seg, o1, lse1, do1):
            kw = kern.kwargs
            res = (q1, k1, v1, seg, None, o1, lse1, kern.dq_mask_info, kern.dkv_mask_info)
            g = kernel_lib._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
                                                 kw["residual_checkpoint_name"], kw["mask_function"],
                                                 kw["attn_logits_soft_cap"], kw["interpret"], res, do1)
            return g[3], g[4], g[5]

        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, T, N, H] -> [B, N, T, H]
        dq, dk, dv = self._per_head(grads, q, k, v, mask, heads_first(out.astype(q.dtype)), lse,
                                    heads_first(d_out.astype(q.dtype)))  # [B, K, G, T, H], [B, K, S, H] x 2
        dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(jnp.float32) * h**-0.5  # q was scaled
        return dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


def _unpack(result):
    out, (lse,) = result
    return out, lse
