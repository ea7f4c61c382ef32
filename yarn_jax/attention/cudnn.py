"""cuDNN flash attention through `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs)."""

from __future__ import annotations

import jax
from jax.typing import DTypeLike

from yarn_jax.attention.window import effective


def takes(dtype: DTypeLike) -> bool:
    """Whether cuDNN's fused attention takes q, k, v in `dtype`: float16 and bfloat16 only (a float32
    evaluation needs another kernel)."""
    return jax.numpy.dtype(dtype) in (jax.numpy.float16, jax.numpy.bfloat16)


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, *, window=None, implementation="cudnn"):
    """Causal self-attention over whole rows; GQA natively (K heads are not repeated). A sliding window
    shorter than the keys is cuDNN's own local window (the query and window - 1 keys before it).

    cuDNN's public entry point has no segment ids, so packed documents (segment_ids not None) are refused
    rather than silently attending across documents; q_index/kv_index must be 0..T-1 (no ring permutation).
    `implementation`: "xla" runs jax's portable path with the same arguments (the CPU tests' check of them).
    """
    if q_segment_ids is not None or kv_segment_ids is not None:
        raise ValueError("attention: 'cudnn' does not support packed segment ids; use attention='reference' or "
                         "data without segment masking")
    if implementation == "cudnn" and not takes(q.dtype):
        raise ValueError(f"attention: 'cudnn' takes float16 or bfloat16, not {q.dtype.name} (the model's dtype); "
                         "use attention='auto' (the reference kernel for float32) or 'reference'")
    window = effective(window, k.shape[1])
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                        implementation=implementation)
