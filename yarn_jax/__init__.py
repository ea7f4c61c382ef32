"""yarn_jax: YaRN context-window extension for LLaMA models in JAX/Flax (arXiv 2309.00071).

Dimension alphabet, used in einsums, shape comments and docstrings throughout:
    B batch, T query position, S key position, D model dim, N query heads, K kv heads,
    G = N / K query heads per kv head, H head dim, F MLP hidden, V vocab, L layers.
"""

from yarn_jax.config import AttentionImpl, LlamaConfig, Remat
from yarn_jax.llama import forward, hidden_states, init_params, logical_axes, unembed
from yarn_jax.rope import apply_rope, cos_sin
from yarn_jax.rope import frequencies as rope_frequencies

__all__ = [
    "AttentionImpl",
    "LlamaConfig",
    "Remat",
    "apply_rope",
    "cos_sin",
    "forward",
    "hidden_states",
    "init_params",
    "logical_axes",
    "rope_frequencies",
    "unembed",
]
