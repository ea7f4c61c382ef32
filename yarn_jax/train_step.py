"""The jitted train step: the next-token loss (`model/loss.py`), gradient accumulation, AdamW with clipping.

    step = build(run_config, cfg, mesh)                       # the one builder: train, aot and bench
    state, metrics = step.fn(state, batch, loss_scale)

batch: tokens, positions, segment_ids [B, T] (global arrays on the mesh).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from yarn_jax import attention, sharding
from yarn_jax.attention.window import effective
from yarn_jax.io import data
from yarn_jax.model.config import LlamaConfig
from yarn_jax.model.llama import param_shardings
from yarn_jax.model.loss import loss_fn
from yarn_jax.model.validate import member, set_field


class Schedule(enum.Enum):  # the learning rate after warm-up
    CONSTANT = "constant"
    COSINE = "cosine"  # to 0 at the last step


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-5
    warmup_steps: int = 20
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0  # global-norm clipping; 0 disables
    schedule: Schedule = Schedule.CONSTANT
    total_steps: int = 400

    def __post_init__(self):
        set_field(self, "schedule", member("optim.schedule", Schedule, self.schedule))
        if not self.lr > 0:
            raise ValueError(f"optim.lr: expected a positive number, got {self.lr!r}")

    @classmethod
    def of_run(cls, config: Any) -> OptimConfig:
        """The run config's `optim`, over its `train.steps`."""
        return cls(**{**config.optim.to_dict(), "total_steps": config.train.steps})


def optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """The paper's recipe by default: AdamW(b1 0.9, b2 0.95), no weight decay, 20 warm-up steps."""
    decay = (optax.constant_schedule(c.lr) if c.schedule is Schedule.CONSTANT else
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


def make_step(cfg: LlamaConfig, mesh: Mesh | None, tx: optax.GradientTransformation, *, grad_accum: int = 1,
              loss_chunk: int = 2048, segment_mask: bool = True):
    """The train step (not yet jitted): grads accumulated over `grad_accum` micro-batches in float32."""

    def grads_of(params, micro):
        (nll, count), g = jax.value_and_grad(
            lambda p: loss_fn(cfg, mesh, loss_chunk, segment_mask, p, micro), has_aux=True)(params)
        return nll, count, g

    def step(state: TrainState, batch: dict[str, jax.Array], loss_scale: jax.Array):
        # micro-batch j takes rows j, j + A, j + 2A, ...: every device holds its share of each micro-batch
        micro = {k: sharding.constrain(
            jnp.swapaxes(v.reshape(v.shape[0] // grad_accum, grad_accum, *v.shape[1:]), 0, 1), mesh,
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


@dataclasses.dataclass(frozen=True)
class Step:
    """A run's train step and what calling and checkpointing it needs."""

    tx: optax.GradientTransformation
    abstract: TrainState  # of jax.ShapeDtypeStruct with shardings: restore and trace targets
    shardings: TrainState  # of NamedSharding
    batch_sharding: jax.sharding.NamedSharding
    fn: Any  # jitted (state, batch, loss_scale) -> (state, metrics); the state is donated


def build(config: Any, cfg: LlamaConfig, mesh: Mesh) -> Step:
    """The train step of run config `config` (`optim`, `train`, `data`) for model `cfg` on `mesh`: the one
    builder of train, aot and the benchmarks. Checks that the batch and sequence divide over the mesh."""
    t, d = config.train, config.data
    sharding.check_batch(mesh, d.batch_size // t.grad_accum, d.seq_len)
    attention.layout(cfg.execution, mesh, d.seq_len)  # checks that the sequence divides over the ring
    tx = optimizer(OptimConfig.of_run(config))
    abstract, shardings = state_shardings(cfg, mesh, tx)
    positions = member("data.positions", data.Positions, d.positions)
    step = make_step(cfg, mesh, tx, grad_accum=t.grad_accum, loss_chunk=t.loss_chunk,
                     segment_mask=positions is data.Positions.DOCUMENT)
    batch_sharding = sharding.batch_sharding(mesh)
    fn = jax.jit(step, in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))
    return Step(tx, abstract, shardings, batch_sharding, fn)


def state_shardings(cfg: LlamaConfig, mesh: Mesh, tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """(abstract TrainState with shardings, the shardings tree) for jit and for Orbax restores."""
    from yarn_jax.model.llama import init_params

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
    """6N + 6 L d S: matmul FLOPs of forward+backward per token with causal attention (no remat). With a
    sliding window W < S a token sees W - W^2 / 2S keys on average, not S / 2: S becomes 2W - W^2 / S."""
    w = effective(cfg.sliding_window, seq_len)
    keys = seq_len if w is None else 2 * w - w * w / seq_len  # twice the mean keys a token sees
    return 6.0 * cfg.num_params() + 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys


def batch_hash(tokens: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]
