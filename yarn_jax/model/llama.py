"""The LLaMA decoder in Flax (linen), with explicit positions and segment ids.

Weights keep their natural axes (q [D, N, H], o [N, H, D], ...); reshaping to Hugging Face's 2-D
layout happens only in the converter. Every parameter and main activation carries logical axis names
(batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, layers) that `sharding.py` maps to a mesh.
Layers are scanned (one compiled layer, parameters stacked on a leading `layers` axis) under the
config's remat policy. Dtype policy: parameters `param_dtype`, matmuls in `dtype`, RMSNorm statistics,
RoPE angles, softmax and logits in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from yarn_jax import attention, sharding
from yarn_jax.attention import cudnn, decode, reference
from yarn_jax.model import projection
from yarn_jax.model import rope as rope_lib
from yarn_jax.model.config import LlamaConfig
from yarn_jax.model.execution import Remat

_INIT = nn.initializers.normal(0.02)  # transformers' initializer_range
DECODE = decode.attention("cpu")  # generation's attention by default: XLA's, any platform


_REMAT_POLICIES = {
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    Remat.ATTENTION: jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out"), cudnn.kernel_outputs),
    Remat.OFFLOAD: jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"], offload_src="device",
        offload_dst="pinned_host"),
}


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Callable = _INIT) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.cfg.execution.param_dtype)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
    """A projection's weight for `projection.dot`. Without remat, as stored: the backward then keeps the
    float32 master itself where autodiff would keep a bf16 copy of every layer's weights (2 bytes a
    parameter; `projection.cast_dot`). Under a remat policy, cast to the compute dtype: the policy then
    sees a plain dot (`dots` keeps its output) and redoes the cast in the backward anyway."""
    w, ex = _param(module, name, shape, axes), module.cfg.execution
    return w if ex.remat is Remat.NONE else w.astype(ex.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis (D; H for Qwen3's per-head q/k norm, `axis_name` "head_dim"),
    statistics in float32 (transformers' LlamaRMSNorm / Qwen3RMSNorm)."""

    cfg: LlamaConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones)
        return rms_norm(x, scale, self.cfg.rms_norm_eps, self.cfg.execution.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """x [..., D] / rms(x) * scale [D]: the statistics in float32, the result and the scale in `dtype`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * y.astype(dtype)


class Attention(nn.Module):
    """GQA self-attention; the kernels are pluggable: `attend` for whole sequences (training, prefill),
    `attend_cache` for a few new tokens against the KV cache, which it writes them into
    (`attention.decode.attention`'s signature). The
    family switches: q/k/v and o biases, per-head RMSNorm of q and k before RoPE, the sliding window.
    Activations are constrained to their logical axes on `mesh` (none: no constraints)."""

    cfg: LlamaConfig
    attend: Callable[..., jax.Array]
    attend_cache: Callable[..., Any] = DECODE
    mesh: Mesh | None = None
    twin: bool = False  # the new tokens are one token twice (`Llama.decode`): only the first is written

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, index, kv=None, cache=None, layer=None, prefill=False):
        """x [B, T, D]. kv/cache (generation): `kv` = (segment_ids, token index [B, S] of all cache slots,
        slot [B]: where each row's new tokens go), `cache` = every layer's (k, v) [L, B, S, K, H], keys after
        RoPE, this one's at `layer`; the new tokens go to slots slot..slot+T of their row. prefill: they
        are the whole sequence (from slot 0), attending to each other with `attend`. Returns (out, cache)."""
        c, dtype = self.cfg, self.cfg.execution.dtype
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q = self._project(x, "q", (d, n, h), "heads")  # [B, T, N, H]
        k_ = self._project(x, "k", (d, k, h), "kv_heads")  # [B, S, K, H]
        v = self._project(x, "v", (d, k, h), "kv_heads")  # [B, S, K, H]
        if c.qk_norm:  # Qwen3: over H of each head, before RoPE
            q = RMSNorm(c, "head_dim", name="q_norm")(q)
            k_ = RMSNorm(c, "head_dim", name="k_norm")(k_)
        q, k_ = rope_lib.rotate(q, cos, sin), rope_lib.rotate(k_, cos, sin)
        q = sharding.constrain(checkpoint_name(q, "q"), self.mesh, ("batch", "seq", "heads", "head_dim"))
        k_ = sharding.constrain(checkpoint_name(k_, "k"), self.mesh, ("batch", "seq", "kv_heads", "head_dim"))
        v = sharding.constrain(checkpoint_name(v, "v"), self.mesh, ("batch", "seq", "kv_heads", "head_dim"))
        window = c.sliding_window
        if cache is None:
            out = self.attend(q, k_, v, segment_ids, segment_ids, index, index, window=window)  # [B, T, N, H]
        else:
            kv_segment_ids, kv_index, slot = kv
            if prefill:  # the whole sequence into the cache; attention with the model's kernel
                cache = tuple(decode.write(c_, new, layer, None, True) for c_, new in zip(cache, (k_, v), strict=True))
                out = self.attend(q, k_, v, None, None, index, index, window=window)
            else:  # a few new tokens written into the cache and attending to it, read in place
                k_new, v_new = (new[:, :1] if self.twin else new for new in (k_, v))
                out, cache = self.attend_cache(q, k_new, v_new, cache, layer, slot, segment_ids, kv_segment_ids,
                                               index, kv_index, window=window)
        out = checkpoint_name(out, "attn_out")
        wo = _weight(self, "o", (n, h, d), ("heads", "head_dim", "embed"))
        # o as one [N * H, D] matrix, a GEMM like the others
        out = projection.dot(out.reshape(*out.shape[:2], n * h), wo, c.execution.fp8, contract=2)
        if c.o_bias:
            out = out + _param(self, "o_bias", (d,), ("embed",), nn.initializers.zeros).astype(dtype)
        return out, cache

    def _project(self, x: jax.Array, name: str, shape: tuple[int, int, int], heads: str) -> jax.Array:
        """x [B, T, D] @ w [D, heads, H] (+ bias [heads, H] when the family has one) -> [B, T, heads, H]."""
        dtype = self.cfg.execution.dtype
        w = _weight(self, name, shape, ("embed", heads, "head_dim"))
        y = projection.dot(x, w, self.cfg.execution.fp8)  # [B, T, heads * H]: a GEMM, see o
        y = y.reshape(*x.shape[:2], *shape[1:])
        if self.cfg.qkv_bias:
            y = y + _param(self, f"{name}_bias", shape[1:], (heads, "head_dim"), nn.initializers.zeros).astype(dtype)
        return y


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    cfg: LlamaConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x):  # x [B, T, D]
        c = self.cfg
        gate = _weight(self, "gate", (c.hidden_size, c.intermediate_size), ("embed", "mlp"))
        up = _weight(self, "up", (c.hidden_size, c.intermediate_size), ("embed", "mlp"))
        down = _weight(self, "down", (c.intermediate_size, c.hidden_size), ("mlp", "embed"))
        fp8 = c.execution.fp8
        hidden = sharding.constrain(swiglu(x, gate, up, fp8), self.mesh, ("batch", "seq", "mlp"))  # [B, T, F]
        return projection.dot(hidden, down, fp8)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, fp8: bool = False) -> jax.Array:
    """silu(x @ gate) * (x @ up): x [B, T, D], gate and up [D, F] (any dtype: `projection.dot`) -> [B, T, F]."""
    return jax.nn.silu(projection.dot(x, gate, fp8)) * projection.dot(x, up, fp8)


class Block(nn.Module):
    """Pre-norm decoder layer; (carry, None) signature so that nn.scan can stack it. The carry is
    (x [B, T, D], the whole KV cache or None): the cache passes through the layer loop as one buffer that
    each layer updates in place and reads at its own index `layer`, never sliced out and stacked again."""

    cfg: LlamaConfig
    attend: Callable[..., jax.Array]
    attend_cache: Callable[..., Any] = DECODE
    mesh: Mesh | None = None
    twin: bool = False  # see Attention.twin

    @nn.compact
    def __call__(self, carry, cos, sin, segment_ids, index, kv=None, layer=None, prefill=False):
        x, cache = carry
        x = checkpoint_name(x, "layer_input")  # what remat 'offload' keeps, in host memory
        attn = Attention(self.cfg, self.attend, self.attend_cache, self.mesh, self.twin, name="attn")
        y, cache = attn(RMSNorm(self.cfg, name="attn_norm")(x), cos, sin, segment_ids, index, kv, cache, layer,
                        prefill)
        x = x + y
        x = x + Mlp(self.cfg, self.mesh, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
        return (sharding.constrain(x, self.mesh, ("batch", "seq", "embed")), cache), None


class Cache(NamedTuple):
    """Generation's KV cache: every layer's keys (after RoPE) and values over S slots."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]


class Llama(nn.Module):
    """tokens [B, T] -> final hidden states [B, T, D] (after the last norm); `unembed` gives logits,
    `decode` runs new tokens against a KV cache. `mesh`: where activations are constrained to lie (by
    sharding.RULES); none for one device."""

    cfg: LlamaConfig
    attend: Callable[..., jax.Array]
    attend_cache: Callable[..., Any] = DECODE
    mesh: Mesh | None = None

    def setup(self):
        c = self.cfg
        self.embedding = _param(self, "embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        if not c.tie_word_embeddings:
            self.lm_head = _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
        self.final_norm = RMSNorm(c)
        block, remat = Block, c.execution.remat
        if remat is not Remat.NONE:
            block = nn.remat(Block, policy=_REMAT_POLICIES[remat], prevent_cse=False)
        self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast,) * 5 + (0, nn.broadcast), length=c.num_layers,
                              unroll=c.execution.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"},
                              # nothing is broadcast out of the loop, so there is no constancy to check; the
                              # check's extra trace of the body raised for a Pallas call in it (a decode step
                              # inside generation's lax.scan; flax 0.12.10, jax 0.11.2, GPU). It stays on for
                              # init only, whose parameter keys it splits: a seed keeps its parameters
                              check_constancy_invariants=self.is_initializing(),
                              )(c, self.attend, self.attend_cache, self.mesh)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array, index: jax.Array,
                 segment_ids: jax.Array | None = None, seq_len: int | None = None) -> jax.Array:
        """tokens, positions (RoPE), index (causal order) [B, T] -> hidden [B, T, D]. segment_ids [B, T]:
        packed documents (None: one per row). seq_len: the length dynamic RoPE methods scale to (default T)."""
        c = self.cfg
        inv_freq, factor = rope_lib.frequencies(c.rope, seq_len or tokens.shape[1], dtype=jnp.float64)  # static: exact
        x, cos, sin = self._embed(tokens, positions, (rope_lib.turn_parts(inv_freq), factor), whole_table=True)
        (x, _), _ = self.layers((x, None), cos, sin, segment_ids, index, None, None, False)
        return self.final_norm(x)

    def decode(self, tokens: jax.Array, *, positions: jax.Array, cache: Cache, start: jax.Array, freqs: Any,
               prefill: bool, slot_index: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """New tokens [B, T] at token indices start[b]..start[b]+T-1 of each row (start [B]) against the
        cache -> (hidden [B, T, D], the cache holding them). freqs: (turn parts, attention factor) from the
        caller (arrays: one compilation serves every length; per row when shaped [B, 1, H/2] and [B, 1, 1]).
        prefill: the tokens are the whole sequence (start 0), attending to each other with the model's
        kernel; otherwise they attend to the cache's slots. slot_index [S]: the token index each slot holds
        (default 0..S-1; a cache split over a ring holds its slots in the ring's order). The parameters'
        layers may be stacked (the layer loop) or per layer (`unstack_layers`: the layers unrolled).

        A single new token on per-layer weights (a decode step at batch 1) runs as two rows, the token
        twice (`twin`), one barrier after the embedding so that XLA cannot see them equal: every projection
        is then a two-row GEMM (GPU XLA turns a one-row dot into a slower multiply + reduction; see
        `projection.dot`) with no padding or slicing around it, and the attention kernel packs the two
        tokens' query heads into the rows its tensor-core dot has anyway. Only the first is written to the
        cache; both attend to the same slots, so they stay equal, and the first is returned."""
        per_layer = self.variables["params"]["layers"]
        twin = isinstance(per_layer, tuple) and not prefill and tokens.size == 1
        if twin:
            tokens, positions = jnp.tile(tokens, (1, 2)), jnp.tile(positions, (1, 2))
        x, cos, sin = self._embed(tokens, positions, freqs, whole_table=prefill)
        x = jax.lax.optimization_barrier(x) if twin else x
        layers, b, s = cache.k.shape[:3]
        held = jnp.arange(s, dtype=jnp.int32) if slot_index is None else slot_index  # [S]
        slot = start if slot_index is None else jnp.argmax(held[None] == start[:, None], axis=1).astype(jnp.int32)
        held = jnp.broadcast_to(held, (b, s))
        kv = ((held < start[:, None] + (1 if twin else tokens.shape[1])).astype(jnp.int32), held, slot)
        ones = jnp.ones(tokens.shape, jnp.int32)
        if isinstance(per_layer, tuple):  # `unstack_layers`: each layer's weights where they lie, no slicing
            carry = (x, tuple(cache))
            block = Block(self.cfg, self.attend, self.attend_cache, self.mesh, twin, parent=None)
            for i, p in enumerate(per_layer):
                carry, _ = block.apply({"params": p}, carry, cos, sin, ones, positions, kv, jnp.int32(i), prefill)
            x, (k, v) = carry
        else:
            (x, (k, v)), _ = self.layers((x, tuple(cache)), cos, sin, ones, positions, kv,
                                         jnp.arange(layers, dtype=jnp.int32), prefill)
        x = self.final_norm(x)
        return (jax.lax.optimization_barrier(x)[:, :1] if twin else x), Cache(k, v)

    def _embed(self, tokens, positions, freqs, *, whole_table: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(embeddings [B, T, D], cos, sin [B, T, H/2]: shared by all layers). whole_table: gather from the
        table with D whole (one all-gather, as for every layer's weights), for whole sequences: their rows,
        taken from the D-sharded table, could reach the batch / sequence split only by being replicated. A
        decode step's few rows are replicated instead (far less than the table, at every token)."""
        cos, sin = rope_lib.cos_sin(positions, *freqs)
        # in the parameter dtype, so that the backward sums each token's gradient rows in float32
        table = sharding.constrain(self.embedding, self.mesh, ("vocab", None)) if whole_table else self.embedding
        x = jnp.take(table, tokens, axis=0).astype(self.cfg.execution.dtype)  # [B, T, D]
        return sharding.constrain(x, self.mesh, ("batch", "seq", "embed")), cos, sin

    def unembed(self, x: jax.Array) -> jax.Array:
        """Hidden states [..., D] -> logits [..., V] in float32."""
        c = self.cfg
        w = self.embedding.T if c.tie_word_embeddings else self.lm_head  # [D, V]
        return projection.logits(x, w.astype(c.execution.dtype))


def unstack_layers(params: Any) -> Any:
    """The parameter tree with its stacked layers [L, ...] as a tuple of L per-layer trees, for
    `Llama.decode`. On GPU, XLA copies a layer's slice of a stacked weight out before a GEMM reads it (a
    decode step would read its MLP weights three times over); separate arrays are read where they lie.
    Costs one copy of the layers' weights, so a decode loop makes it once, outside its steps."""
    stacked = params["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(count))}


def model(cfg: LlamaConfig, attend: Callable[..., jax.Array] | None = None,
          attend_cache: Callable[..., Any] = DECODE, mesh: Mesh | None = None) -> Llama:
    return Llama(cfg, attend or attention.select(cfg.execution.attention), attend_cache, mesh)


def _init(cfg: LlamaConfig, key: jax.Array) -> Any:
    one = jnp.zeros((1, 1), jnp.int32)
    return model(cfg, reference.attention).init(key, one, positions=one, index=one)


def init_params(cfg: LlamaConfig, key: jax.Array) -> Any:
    """Random parameters (normal(0.02), norms at 1), a plain pytree of arrays."""
    return nn.unbox(_init(cfg, key)["params"])


def logical_axes(cfg: LlamaConfig) -> Any:
    """The parameter tree's logical axis names, as PartitionSpecs of logical names (no arrays made)."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _init(cfg, jax.random.key(0)))["params"])


def param_shardings(cfg: LlamaConfig, mesh: Mesh) -> Any:
    """NamedShardings for the parameter tree of `cfg` (same structure as init_params), by sharding.RULES;
    a dimension its mesh axes do not divide is replicated over them (`sharding.logical_sharding`)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda spec, s: sharding.logical_sharding(mesh, spec, s.shape), logical_axes(cfg), shapes,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def hidden_states(cfg: LlamaConfig, params: Any, tokens: jax.Array, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, index: jax.Array | None = None, *,
                  seq_len: int | None = None, attend: Callable[..., jax.Array] | None = None,
                  mesh: Mesh | None = None) -> jax.Array:
    """Final-norm hidden states [B, T, D] in the execution dtype.

    positions [B, T]: RoPE positions (default 0..T-1). segment_ids [B, T]: packed documents attend only
    within their segment (default None: one document per row). index [B, T]: each token's place in the
    sequence, for causality (default 0..T-1; ring attention passes its permutation). seq_len: the length
    dynamic RoPE methods scale to (default T). attend: the attention (default: the execution's kernel on one
    device). mesh: activations are constrained to their sharding on it (`attention.for_mesh` gives its attend).
    """
    b, t = tokens.shape
    arange = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = arange if positions is None else positions.astype(jnp.int32)
    index = arange if index is None else index.astype(jnp.int32)
    segment_ids = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return model(cfg, attend, mesh=mesh).apply({"params": params}, tokens, positions=positions, index=index,
                                               segment_ids=segment_ids, seq_len=seq_len or t)


def unembedding(cfg: LlamaConfig, params: Any) -> jax.Array:
    """The unembedding matrix [D, V] in the parameter dtype (the embedding's transpose when tied)."""
    return params["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


def unembed(cfg: LlamaConfig, params: Any, hidden: jax.Array) -> jax.Array:
    """Hidden states [..., D] -> logits [..., V] float32."""
    return model(cfg, reference.attention).apply({"params": params}, hidden, method=Llama.unembed)


@jax.jit(static_argnames=("cfg", "seq_len", "mesh"))
def _forward(cfg, params, tokens, positions, segment_ids, seq_len, mesh):
    b, t = tokens.shape
    attend, layout = attention.for_mesh(cfg.execution, mesh, t)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
    hidden = hidden_states(cfg, params, layout.apply(tokens), layout.apply(positions), layout.apply(segment_ids),
                           layout.index(b, t), seq_len=seq_len or t, attend=attend, mesh=mesh)
    return layout.restore(unembed(cfg, params, hidden))


def forward(cfg: LlamaConfig, params: Any, tokens: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, *, seq_len: int | None = None, mesh: Mesh | None = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, V] float32 (jitted). See `hidden_states` for the arguments.

    With `mesh`, runs sharded by sharding.RULES (parameters should already be placed, e.g. by
    load_checkpoint(path, mesh) or device_put onto param_shardings); ring attention when the mesh's seq axis > 1.
    """
    tokens = jnp.asarray(tokens)
    positions = None if positions is None else jnp.asarray(positions)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    if mesh is not None:
        sharding.check_batch(mesh, *tokens.shape)
    return _forward(cfg, params, tokens, positions, segment_ids, seq_len, mesh)
