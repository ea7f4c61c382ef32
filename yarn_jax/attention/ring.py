"""Ring attention over the mesh's 'seq' axis (Liu et al. 2023), causal and load-balanced, every block a
block kernel (`block.py`: cuDNN on GPU, splash on TPU, the XLA loop elsewhere).

Each device holds one query block; key/value blocks travel around the ring with `ppermute` while the
current block is computed. The forward merges each block's (out, lse) into the running result through
the log-sum-exp, in float32. The backward is a `custom_vjp` that sends K/V around the ring again with
their float32 gradient accumulators and calls each block's backward with the *global* output and lse, so
per-block gradients simply add up; memory is O(S / ring) per device.

Causal load balancing: the sequence is permuted before the model (`permutation`) so every device gets the
same causal work. Positions, segment ids and token indices follow the permutation, so RoPE sees true
global positions.
  - zigzag: device i holds chunks i and 2R-1-i of 2R, in token order. Its own K/V form one causal block;
    K/V from a device j < i are all seen by both of its query chunks, but only their first chunk (j) is
    earlier than both, so the block is (all queries, first key chunk); from j > i only the second query
    chunk (2R-1-i) sees them, all of them: (second query chunk, all keys). Every ring step is a fully
    visible or a causal block of the same size and no invisible pair is ever computed, so fused kernels
    with positional masks run the whole ring.
  - striped: device i holds tokens i, i+R, i+2R, ...; every block is causal by token index, not by
    position, which only the XLA block kernel takes (`Mask.q_index`); it skips invisible chunk pairs.
A sliding window (Mistral's, Qwen's) is a distance between token indices, so its blocks carry them too and
run the XLA block kernel, which skips the chunk pairs the window hides (the K/V still travel the whole
ring).
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jax.typing import DTypeLike

from yarn_jax.attention import block_xla, decode
from yarn_jax.attention.block import BlockKernel, Mask
from yarn_jax.attention.sharded import specs
from yarn_jax.attention.window import effective
from yarn_jax.model.execution import RingLayout, divisor_at_most
from yarn_jax.sharding import SEQ_AXIS, ring_size

_log = logging.getLogger(__name__)


def permutation(seq_len: int, ring: int, layout: RingLayout) -> np.ndarray:
    """perm [T]: x[:, perm] puts each device's tokens in its contiguous block of T / ring."""
    if layout is RingLayout.ZIGZAG:
        if seq_len % (2 * ring):
            raise ValueError(f"seq_len: expected a multiple of 2 x the ring size ({2 * ring}) for the zigzag "
                             f"layout, got {seq_len}")
        chunks = np.arange(seq_len).reshape(2 * ring, seq_len // (2 * ring))
        return np.concatenate([np.concatenate([chunks[i], chunks[2 * ring - 1 - i]]) for i in range(ring)])
    if seq_len % ring:
        raise ValueError(f"seq_len: expected a multiple of the ring size ({ring}), got {seq_len}")
    return np.arange(seq_len).reshape(seq_len // ring, ring).T.reshape(-1)


def visible_fraction(seq_len: int, ring: int, layout: RingLayout) -> float:
    """The fraction of the XLA block kernel's (query chunk, key chunk) pairs that run in the striped
    layout (the others are skipped), over every device and ring step, one document per row; about half,
    plus the diagonal. The zigzag schedule computes only visible blocks: 1."""
    if layout is RingLayout.ZIGZAG:
        return 1.0
    blocks = permutation(seq_len, ring, layout).reshape(ring, -1)  # [R, T]: token indices per device
    t = blocks.shape[1]
    cq, ck = divisor_at_most(t, block_xla.Q_CHUNK), divisor_at_most(t, block_xla.KV_CHUNK)
    q_last = blocks.reshape(ring, t // cq, cq).max(-1)  # [R, T / cq]
    k_first = blocks.reshape(ring, t // ck, ck).min(-1)  # [R, T / ck]
    return float(np.mean(q_last[:, :, None, None] >= k_first[None, None, :, :]))


# ----------------------------------------------------------------------------- the schedule


class _View(NamedTuple):
    """One ring step's block: the rows of the local queries and of the held K/V it pairs, and its mask."""

    q: slice
    kv: slice
    causal: bool


_ALL = slice(None)


def _views(layout: RingLayout, t: int, step: int | jax.Array, device: jax.Array, ring: int):
    """(views, index): the candidate blocks of ring step `step` (K/V from device (device - step) mod R) and
    which one applies (traced; None when there is one candidate). Step 0 is the static first step."""
    if layout is RingLayout.STRIPED or isinstance(step, int):
        return [_View(_ALL, _ALL, True)], None
    c = t // 2
    earlier = _View(_ALL, slice(None, c), False)  # from j < i: every query sees chunk j, none sees 2R-1-j
    later = _View(slice(c, None), _ALL, False)  # from j > i: only chunk 2R-1-i sees them, all of them
    return [earlier, later], ((device - step) % ring > device).astype(jnp.int32)


def _mask(layout: RingLayout, window: int | None, view: _View, q_ids: tuple, kv_ids: tuple) -> Mask:
    """The kernel's mask of `view`; ids are (segment ids or None, token indices) of queries / held keys."""
    rows = lambda x, r: None if x is None else x[:, r]  # noqa: E731
    explicit = layout is RingLayout.STRIPED or window is not None
    return Mask(view.causal, rows(q_ids[0], view.q), rows(kv_ids[0], view.kv),
                rows(q_ids[1], view.q) if explicit else None, rows(kv_ids[1], view.kv) if explicit else None,
                window)


def _switch(index, branches, *args):
    return branches[0](*args) if index is None else jax.lax.switch(index, branches, *args)


def _shift(axis: str, ring: int, xs):
    """Send each array of the tuple `xs` (None entries stay None) to the next device on the ring."""
    perm = [(i, (i + 1) % ring) for i in range(ring)]
    return tuple(None if x is None else jax.lax.ppermute(x, axis, perm) for x in xs)


def _stay(xs):
    """The shift of `device_work`: the blocks stay where they are (one device alone, for timing)."""
    return xs


# ----------------------------------------------------------------------------- forward and backward


def _merge_rows(acc, lse, rows: slice, out, lse_b):
    """acc [B, T, N, H] / lse [B, N, T] float32 with one block's (out, lse_b) merged into `rows`."""
    a, l_a = acc[:, rows], lse[..., rows]
    new = jnp.logaddexp(l_a, lse_b)
    w = lambda x: jnp.exp(x - new).transpose(0, 2, 1)[..., None]  # noqa: E731  [B, T, N, 1]
    return acc.at[:, rows].set(a * w(l_a) + out.astype(jnp.float32) * w(lse_b)), lse.at[..., rows].set(new)


def _forward(kernel, shift, ring, layout, window, device, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    # One barrier over all inputs: inside a scan over layers JAX would otherwise hoist out of the loop
    # whatever is computed from layer-invariant inputs alone (the ids, their masks broadcast over heads).
    q, k, v, q_seg, kv_seg, q_idx, kv_idx = jax.lax.optimization_barrier((q, k, v, q_seg, kv_seg, q_idx, kv_idx))
    t = q.shape[1]
    q_ids = (q_seg, q_idx)

    def compute(acc_lse, step, held):  # held: (k, v, kv_seg, kv_idx) of device (device - step) mod R
        views, index = _views(layout, t, step, device, ring)

        def run(view, acc, lse):
            out, lse_b = kernel.forward(q[:, view.q], held[0][:, view.kv], held[1][:, view.kv],
                                        _mask(layout, window, view, q_ids, held[2:]))
            return _merge_rows(acc, lse, view.q, out, lse_b)

        if acc_lse is None:  # step 0: the device's own block sees every query row
            out, lse = kernel.forward(q, held[0], held[1], _mask(layout, window, views[0], q_ids, held[2:]))
            return out.astype(jnp.float32), lse
        return _switch(index, [functools.partial(run, view) for view in views], *acc_lse)

    held = (k, v, kv_seg, kv_idx)
    acc_lse = compute(None, 0, held)

    def step(carry, s):  # the next block's transfer depends only on the held one: it overlaps the compute
        acc, lse, held = carry
        return (*compute((acc, lse), s, held), shift(held)), None

    if ring > 1:  # the last step's transfer goes unused
        acc_lse = jax.lax.scan(step, (*acc_lse, shift(held)), jnp.arange(1, ring))[0][:2]
    acc, lse = acc_lse
    return acc.astype(q.dtype), lse


def _backward(kernel, shift, ring, layout, window, res, d_out):
    device, q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse = res
    t = q.shape[1]
    q_ids, do = (q_seg, q_idx), d_out.astype(q.dtype)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def compute(dq, step, held, grads):  # held: (k, v, kv_seg, kv_idx) of device (device - step) mod R;
        views, index = _views(layout, t, step, device, ring)  # grads: its float32 (dk, dv) accumulators

        def run(view, dq, dk, dv):
            g_q, g_k, g_v = kernel.backward(q[:, view.q], held[0][:, view.kv], held[1][:, view.kv],
                                            out[:, view.q], lse[..., view.q], do[:, view.q],
                                            _mask(layout, window, view, q_ids, held[2:]))
            return (dq.at[:, view.q].add(f32(g_q)), dk.at[:, view.kv].add(f32(g_k)),
                    dv.at[:, view.kv].add(f32(g_v)))

        dq, *grads = _switch(index, [functools.partial(run, view) for view in views], dq, *grads)
        return dq, shift(tuple(grads))

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    held = (k, v, kv_seg, kv_idx)
    dq, grads = compute(zeros(q), 0, held, (zeros(k), zeros(v)))

    def step(carry, s):  # K/V move on while this block computes; its gradients follow once computed
        dq, held, grads = carry
        dq, grads = compute(dq, s, held, grads)
        return (dq, shift(held), grads), None

    if ring > 1:
        dq, _, grads = jax.lax.scan(step, (dq, shift(held), grads), jnp.arange(1, ring))[0]
    dk, dv = grads  # after R shifts every accumulator is back on its own device
    return None, dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _ring(kernel, shift, ring, layout, window, device, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    """One device's part of the ring: q, k, v [B, T / R, ...] its blocks; `shift` moves held blocks to the
    next device; device: this device's position on the ring, an input rather than `lax.axis_index`
    (which, inside a scan over layers under autodiff, left shardy a manual computation with no sharded
    operand)."""
    return _forward(kernel, shift, ring, layout, window, device, q, k, v, q_seg, kv_seg, q_idx, kv_idx)[0]


def _ring_fwd(kernel, shift, ring, layout, window, device, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    out, lse = _forward(kernel, shift, ring, layout, window, device, q, k, v, q_seg, kv_seg, q_idx, kv_idx)
    return out, (device, q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse)


_ring.defvjp(_ring_fwd, _backward)

_warned: set[str] = set()


def _kernel_for(kernel: BlockKernel, layout: RingLayout, window: int | None, segments: bool, local: int,
                dtype: DTypeLike) -> BlockKernel:
    """`kernel`, or the XLA block kernel (with one warning line per reason) where it cannot take the masks,
    the blocks (`local` tokens per device; zigzag hands the kernel halves of them) or q, k, v's `dtype`."""
    ids = np.zeros((1, 1), np.int32)  # stands for arrays the masks will carry; `supports` reads only which
    view = _View(_ALL, _ALL, True)
    mask = _mask(layout, window, view, (ids if segments else None, ids), (ids if segments else None, ids))
    block = local // 2 if layout is RingLayout.ZIGZAG else local
    why = kernel.supports(mask, block, dtype)
    if why is None:
        return kernel
    if why not in _warned:
        _warned.add(why)
        _log.warning("ring attention: %s; its blocks run the XLA loop instead (several times slower)", why)
    return block_xla.Kernel()


def ring_attention(mesh: Mesh, kernel: BlockKernel, layout: RingLayout):
    """An attention function (the signature of yarn_jax.attention) running the ring over the sequence axis
    of `mesh` (SEQ_AXIS) with `kernel` for its blocks. Inputs are global arrays whose sequence is permuted
    by `permutation(T, ring, layout)`."""
    axis, ring = SEQ_AXIS, ring_size(mesh)
    q_spec, kv_spec, ids = specs(True)

    def attend(q, k, v, q_seg, kv_seg, q_idx, kv_idx, *, window=None):
        window = effective(window, k.shape[1])
        local = q.shape[1] // ring
        body = functools.partial(_ring, _kernel_for(kernel, layout, window, q_seg is not None, local, q.dtype),
                                 functools.partial(_shift, axis, ring), ring, layout, window)
        devices = jnp.arange(ring, dtype=jnp.int32)  # [R] over the ring: each device gets its own position
        return jax.shard_map(lambda d, *xs: body(d[0], *xs), mesh=mesh,
                             in_specs=(PartitionSpec(axis), q_spec, kv_spec, kv_spec, ids, ids, ids, ids),
                             out_specs=q_spec, check_vma=False)(devices, q, k, v, q_seg, kv_seg, q_idx, kv_idx)

    return attend


def device_work(kernel: BlockKernel, ring: int, device: int, layout: RingLayout = RingLayout.ZIGZAG):
    """(q, k, v) -> out with the ring's backward: device `device`'s R block steps of a ring of `ring` (the
    same masks, views and skips), on one device, its own K/V standing in for every other device's (same
    shapes, no communication). q [B, T / R, N, H], k / v [B, T / R, K, H], one document per row. For
    timing a ring's per-device work where there is one GPU (`bench attention --impl ring`)."""

    def work(q, k, v):
        b, t = q.shape[:2]
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return _ring(kernel, _stay, ring, layout, None, jnp.int32(device), q, k, v, None, None, idx, idx)

    return work


def decode_attention(mesh: Mesh):
    """Attention of a few new queries (on every device of SEQ_AXIS) to a KV cache split over it, with the
    signature of yarn_jax.attention.decode: q [B, t, N, H]; k, v [L, B, S, K, H] (S split) read at
    `layer`; segment ids / token indices [B, t] and [B, S] by cache slot (the cache is in the ring's
    order). Each device attends to its own slots (the XLA block kernel, masks by token index); the partial
    (out, lse) of the devices merge as the parts of one device's cache do (`decode.merge`), after one
    all-gather of [B, t, N, H + 1] per device."""
    (q_spec, _, q_ids), (_, kv_spec, kv_ids) = specs(False), specs(True)
    cache_spec = PartitionSpec(None, *kv_spec)

    def local(q, k, v, layer, q_seg, kv_seg, q_idx, kv_idx, window):  # each device: its own slots
        out, lse = block_xla.forward(q, k[layer], v[layer], Mask(True, q_seg, kv_seg, q_idx, kv_idx, window))
        both = jnp.concatenate([out.astype(jnp.float32), lse.transpose(0, 2, 1)[..., None]], axis=-1)
        parts = jax.lax.all_gather(both, SEQ_AXIS)  # [R, B, t, N, H + 1]
        return decode.merge(parts[..., :-1], parts[..., -1], axis=0).astype(q.dtype)

    def attend(q, k, v, layer, q_seg, kv_seg, q_idx, kv_idx, *, window=None):
        in_specs = (q_spec, cache_spec, cache_spec, PartitionSpec(), q_ids, kv_ids, q_ids, kv_ids)
        return jax.shard_map(functools.partial(local, window=effective(window, k.shape[2])), mesh=mesh,
                             in_specs=in_specs, out_specs=q_spec,
                             check_vma=False)(q, k, v, layer, q_seg, kv_seg, q_idx, kv_idx)

    return attend
