"""cuDNN flash attention through `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs)."""

from __future__ import annotations

import jax


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index):
    """Causal self-attention over whole rows; GQA natively (K heads are not repeated).

    cuDNN's public entry point has no segment ids, so packed documents (segment_ids not None) are refused
    rather than silently attending across documents; q_index/kv_index must be 0..T-1 (no ring permutation).
    """
    if q_segment_ids is not None or kv_segment_ids is not None:
        raise ValueError("attention: 'cudnn' does not support packed segment ids; use attention='reference' or "
                         "data without segment masking")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
