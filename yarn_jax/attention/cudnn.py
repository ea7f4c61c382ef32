"""cuDNN flash attention through `jax.nn.dot_product_attention(implementation='cudnn')` (NVIDIA GPUs); packed
documents through cuDNN's packed layout (jax's private entry point, as the ring's cuDNN blocks).

Packed documents (segment ids): each row's runs of equal ids are its documents (the data pipeline numbers
them in order; padding, id 0, is a run of its own, as the reference lets padding see padding). cuDNN's
packed layout takes a static number of documents a row, `PACKED_DOCUMENTS`, as their lengths [B, M] and
first tokens [B, M + 1]; each is then causal from its own first token. A batch with a row of more
documents runs the XLA block kernel instead (`lax.cond`: exact, ~14x slower attention), as do GPUs before
Hopper, where cuDNN has no packed layout. The step cannot say which branch ran (a host callback needs a CPU
device, which `JAX_PLATFORMS=cuda` removes): the trainer counts each batch's documents on the host
(`documents`, `packed_limit`) and warns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from yarn_jax.attention import block_xla
from yarn_jax.attention.block import Mask, UnsupportedJaxError
from yarn_jax.attention.window import effective

SUPPORTED_JAX = ("0.10.", "0.11.")  # the jax versions `fused` is written against
# documents a row cuDNN's packed layout is set up for; its softmax statistics are [B * this, N, T] float32
PACKED_DOCUMENTS = 16


def fused():
    """jax's private cuDNN fused-attention module (`jax._src.cudnn.fused_attention_stablehlo`), for the
    ring's cuDNN blocks and the packed layout; jax 0.12 changed its signatures, so other versions are
    refused."""
    if not jax.__version__.startswith(SUPPORTED_JAX):
        raise UnsupportedJaxError(f"attention: the cuDNN ring blocks and packed documents are written for jax "
                                  f"{' / '.join(SUPPORTED_JAX)}x (private fused-attention entry points), this is jax "
                                  f"{jax.__version__}; use model.attention='reference' for the portable XLA blocks")
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


def takes(dtype: DTypeLike) -> bool:
    """Whether cuDNN's fused attention takes q, k, v in `dtype`: float16 and bfloat16 only (a float32
    evaluation needs another kernel)."""
    return jax.numpy.dtype(dtype) in (jax.numpy.float16, jax.numpy.bfloat16)


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, *, window=None, implementation="cudnn"):
    """Causal self-attention over whole rows; GQA natively (K heads are not repeated; the packed layout
    repeats them: `_packed_cudnn`). A sliding window shorter than the keys is cuDNN's own local window (the
    query and window - 1 keys before it). Packed documents (segment ids not None; self-attention: the
    keys' ids are the queries'); with a window too, they run the XLA block kernel (cuDNN's packed layout
    takes no window).

    q_index/kv_index must be 0..T-1 (no ring permutation). `implementation`: "xla" runs jax's portable path
    with the same arguments, packed documents as the mask cuDNN's lengths and offsets describe (the CPU
    tests' check of them).
    """
    if implementation == "cudnn" and not takes(q.dtype):
        raise ValueError(f"attention: 'cudnn' takes float16 or bfloat16, not {q.dtype.name} (the model's dtype); "
                         "use attention='auto' (the reference kernel for float32) or 'reference'")
    window = effective(window, k.shape[1])
    if q_segment_ids is None and kv_segment_ids is None:
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                            implementation=implementation)
    if q_segment_ids is None or q.shape[1] != k.shape[1]:
        raise ValueError("attention: 'cudnn' takes packed documents (segment ids) in self-attention only; use "
                         "attention='reference' or data.positions='chunk'")
    if window is not None:
        return block_xla.attention(q, k, v, Mask(True, q_segment_ids, q_segment_ids, window=window))
    return _documents(q, k, v, q_segment_ids, implementation)


def runs(segment_ids: jax.Array, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """segment_ids [B, T] -> (lengths [B, m], starts [B, m + 1], count [B]) int32: the lengths and first
    tokens of each row's first m runs of equal ids, -1 past the row's last run (the layout of jax's
    `q_seqlen` / `q_offsets`), and the number of runs in each row."""
    b, t = segment_ids.shape
    new = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)  # [B, T]
    count = jnp.sum(new, axis=1, dtype=jnp.int32)
    first = jax.vmap(lambda row: jnp.nonzero(row, size=m + 1, fill_value=t)[0])(new).astype(jnp.int32)  # [B, m+1]
    run = jnp.arange(m + 1, dtype=jnp.int32)[None]  # [1, m+1]
    lengths = jnp.where(run[:, :m] < count[:, None], first[:, 1:] - first[:, :m], -1)
    return lengths, jnp.where(run < count[:, None], first, -1), count


def documents(segment_ids: np.ndarray) -> np.ndarray:
    """Host segment ids [B, T] -> [B] the number of documents (runs of equal ids) in each row, as `runs`
    counts them inside the step."""
    return 1 + np.count_nonzero(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)


def packed_limit() -> int:
    """Documents a row this host's GPUs run through cuDNN's packed layout (more: the XLA block kernel);
    0 before Hopper."""
    return PACKED_DOCUMENTS if _hopper() else 0


def _documents(q, k, v, segment_ids, implementation):
    """Self-attention within each row's documents: cuDNN's packed layout where every row has at most
    PACKED_DOCUMENTS of them, else the XLA block kernel."""
    if implementation == "cudnn" and not _hopper():
        return block_xla.attention(q, k, v, Mask(True, segment_ids, segment_ids))
    lengths, starts, count = runs(segment_ids, PACKED_DOCUMENTS)
    packed = _packed_cudnn if implementation == "cudnn" else _packed_xla
    return jax.lax.cond(jnp.all(count <= PACKED_DOCUMENTS), lambda q, k, v: packed(q, k, v, lengths, starts),
                        lambda q, k, v: block_xla.attention(q, k, v, Mask(True, segment_ids, segment_ids)), q, k, v)


def _hopper() -> bool:
    return all(float(getattr(d, "compute_capability", 0)) >= 9.0 for d in jax.local_devices(backend="gpu"))


def kernel_outputs(prim, *_, **__) -> bool:
    """A remat policy: keep cuDNN's forward kernel's outputs, the attention output and its softmax
    statistics, which its backward needs (naming the output alone would re-run the forward kernel for the
    statistics)."""
    return prim.name.startswith("dot_product_attention_fwd")


@functools.partial(jax.checkpoint, policy=kernel_outputs)
def _packed_cudnn(q, k, v, lengths, starts):
    """GQA as MHA: jax's binding scales both offsets by the queries' N x H elements a token (jax 0.10-0.11),
    right for K/V only with N heads, so K/V are repeated here; the repeat is redone in the backward (the
    checkpoint keeps the kernel's outputs, not the repeated K/V)."""
    lib = fused()
    k, v = (jnp.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    return lib.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts,
                                     kv_offsets=starts, scale=q.shape[-1] ** -0.5,
                                     mask_type=lib.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def _packed_xla(q, k, v, lengths, starts):
    """What `_packed_cudnn` is told, as an explicit mask [B, 1, T, T]: a query sees the keys of its own
    run up to itself (tokens of no described run see nothing; their rows are not used)."""
    t = q.shape[1]
    pos = jnp.arange(t)
    inside = ((pos >= starts[:, :-1, None]) & (pos < starts[:, :-1, None] + lengths[:, :, None])
              & (lengths[:, :, None] > 0))  # [B, M, T]
    same = jnp.einsum("bmi,bmj->bij", inside.astype(jnp.int32), inside.astype(jnp.int32)) > 0
    return jax.nn.dot_product_attention(q, k, v, mask=(same & (pos[:, None] >= pos[None, :]))[:, None],
                                        implementation="xla")
