"""yarn_jax: YaRN context-window extension for LLaMA models in JAX/Flax (arXiv 2309.00071).

Dimension alphabet, used in einsums, shape comments and docstrings throughout:
    B batch, T query position, S key position, D model dim, N query heads, K kv heads,
    G = N / K query heads per kv head, H head dim, F MLP hidden, V vocab, L layers.
"""

from yarn_jax.io.checkpoint import load_checkpoint
from yarn_jax.model.config import LlamaConfig
from yarn_jax.model.execution import AttentionImpl, Execution, Remat, RingLayout
from yarn_jax.model.llama import forward, hidden_states, init_params, logical_axes, unembed
from yarn_jax.model.rope import apply_rope, cos_sin
from yarn_jax.model.rope import frequencies as rope_frequencies
from yarn_jax.sharding import make_mesh


def __getattr__(name: str):
    """load_hf / save_hf load yarn_jax.convert lazily, so `python -m yarn_jax.convert` runs it only once."""
    if name in ("load_hf", "save_hf"):
        from yarn_jax import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'yarn_jax' has no attribute {name!r}")


__all__ = [
    "AttentionImpl",
    "Execution",
    "LlamaConfig",
    "Remat",
    "RingLayout",
    "apply_rope",
    "cos_sin",
    "forward",
    "hidden_states",
    "init_params",
    "load_checkpoint",
    "load_hf",
    "logical_axes",
    "make_mesh",
    "rope_frequencies",
    "save_hf",
    "unembed",
]
