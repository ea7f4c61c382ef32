"""The jitted train step: chunked next-token loss, gradient accumulation, AdamW with clipping.

    state, metrics = step(state, batch, loss_scale)

batch: tokens, positions, segment_ids [B, T] (global arrays on the mesh). The loss never materialises
[B, T, V] float32 logits: the final hidden states are cut into chunks of `loss_chunk` tokens whose logits
are computed, reduced and recomputed in the backward pass (jax.checkpoint). With the mesh's seq axis > 1
the batch is permuted to the ring's layout first; every per-token term follows the permutation, so the
loss is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from yarn_jax import attention
from yarn_jax.config import LlamaConfig
from yarn_jax.llama import hidden_states, param_shardings, unembed


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-5
    warmup_steps: int = 20
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0  # global-norm clipping; 0 disables
    schedule: str = "constant"  # constant | cosine (after warmup)
    total_steps: int = 400

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule: expected 'constant' or 'cosine', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr: expected a positive number, got {self.lr!r}")


def optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """The paper's recipe by default: AdamW(b1 0.9, b2 0.95), no weight decay, 20 warm-up steps."""
    decay = (optax.constant_schedule(c.lr) if c.schedule == "constant" else
             optax.cosine_decay_schedule(c.lr, max(1, c.total_steps - c.warmup_steps)))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), decay], [c.warmup_steps])
    parts = [optax.clip_by_global_norm(c.clip)] if c.clip > 0 else []
    return optax.chain(*parts, optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array


def targets(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token targets [B, T] and weights [B, T]: the last position and positions whose next token
    starts another segment have no target."""
    nxt = jnp.roll(tokens, -1, axis=1)
    same = segment_ids == jnp.roll(segment_ids, -1, axis=1)
    last = jnp.arange(tokens.shape[1]) == tokens.shape[1] - 1
    return nxt, (same & ~last[None]).astype(jnp.float32)


def chunked_nll(cfg: LlamaConfig, params: Any, hidden: jax.Array, tgt: jax.Array, weights: jax.Array,
                chunk: int) -> jax.Array:
    """Sum of weighted negative log-likelihoods; logits [B, chunk, V] float32 exist one chunk at a time."""
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"train.loss_chunk: expected a divisor of seq_len ({t}), got {chunk}")
    n = t // chunk
    # chunk i holds positions i, i + n, i + 2n, ...: each chunk spans every 'seq' shard, so the scan runs
    # over an unsharded axis and no device waits for another's chunk (the sum does not care about order)
    split = lambda x: jnp.moveaxis(x.reshape(b, chunk, n, *x.shape[2:]), 2, 0)  # noqa: E731

    @jax.checkpoint
    def one(h, y, w):  # [B, c, D], [B, c], [B, c]
        logits = unembed(cfg, params, h)  # [B, c, V] float32
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * w)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0), (split(hidden), split(tgt), split(weights)))
    return total


def loss_fn(cfg: LlamaConfig, mesh: Mesh | None, loss_chunk: int, segment_mask: bool, params: Any,
            batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL, number of target tokens) for one micro-batch. segment_mask: attention stays inside
    each segment (packed documents); otherwise whole chunks attend causally (the paper's chunks).
    batch["weights"] [B, T] (optional) further weights the prediction made at each position (evaluation
    scores only the tokens a sliding window has not scored yet)."""
    tokens, positions, segment_ids = batch["tokens"], batch["positions"], batch["segment_ids"]
    tgt, w = targets(tokens, segment_ids)
    if "weights" in batch:
        w = w * batch["weights"]
    b, t = tokens.shape
    index = None
    if mesh is not None and mesh.shape["seq"] > 1:
        perm = attention.ring.permutation(t, mesh.shape["seq"], cfg.ring_layout)
        tokens, positions, segment_ids, tgt, w = (x[:, perm] for x in (tokens, positions, segment_ids, tgt, w))
        index = jnp.broadcast_to(jnp.asarray(perm, jnp.int32), (b, t))
    hidden = hidden_states(cfg, params, tokens, positions, segment_ids if segment_mask else None, index,
                           attend=attention.for_mesh(cfg, mesh))
    return chunked_nll(cfg, params, hidden, tgt, w, loss_chunk), jnp.sum(w)


def make_step(cfg: LlamaConfig, mesh: Mesh | None, tx: optax.GradientTransformation, *, grad_accum: int = 1,
              loss_chunk: int = 2048, segment_mask: bool = True):
    """The train step (not yet jitted): grads accumulated over `grad_accum` micro-batches in float32."""

    def grads_of(params, micro):
        (nll, count), g = jax.value_and_grad(
            lambda p: loss_fn(cfg, mesh, loss_chunk, segment_mask, p, micro), has_aux=True)(params)
        return nll, count, g

    def step(state: TrainState, batch: dict[str, jax.Array], loss_scale: jax.Array):
        # micro-batch j takes rows j, j + A, j + 2A, ...: every device holds its share of each micro-batch
        micro = {k: nn.with_logical_constraint(
            jnp.swapaxes(v.reshape(v.shape[0] // grad_accum, grad_accum, *v.shape[1:]), 0, 1),
            (None, "batch", "seq")) for k, v in batch.items()}

        def acc(carry, mb):
            nll, count, g = carry
            n, c, gi = grads_of(state.params, mb)
            return (nll + n, count + c, jax.tree.map(jnp.add, g, gi)), None

        if grad_accum == 1:  # no zeroed float32 accumulators to fill and add to
            nll, count, g = grads_of(state.params, jax.tree.map(lambda v: v[0], micro))
            g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (nll, count, g), _ = jax.lax.scan(acc, (jnp.float32(0), jnp.float32(0), zeros), micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda x, p: (x / count * loss_scale).astype(p.dtype), g, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": nll / count * loss_scale, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return TrainState(params, opt_state, state.step + 1), metrics

    return step


def state_shardings(cfg: LlamaConfig, mesh: Mesh, tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """(abstract TrainState with shardings, the shardings tree) for jit and for Orbax restores."""
    from yarn_jax.llama import init_params

    p_shard = param_shardings(cfg, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), p_shard)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # moments take their parameter's sharding, everything else (counts) is replicated. (Asking the
    # compiler for tx.init's output shardings instead gave replicated moments on TPU topologies.)
    opt_abstract = optax.tree_map_params(
        tx, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), jax.eval_shape(tx.init, params),
        params, transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated))
    abstract = TrainState(params, opt_abstract, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    return abstract, jax.tree.map(lambda x: x.sharding, abstract)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """6N + 6 L d S: matmul FLOPs of forward+backward per token with causal attention (no remat)."""
    return 6.0 * cfg.num_params() + 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def batch_hash(tokens: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]
