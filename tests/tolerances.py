"""Per-dtype tolerances, in one table (STYLE.md habit 6)."""

import jax.numpy as jnp

# dtype -> (rtol, atol) for comparing a fast path against the float32 reference
TOL = {
    jnp.float32: (1e-5, 1e-5),
    jnp.bfloat16: (2e-2, 2e-2),
}
HF_LOGITS_ATOL = 1e-4  # our float32 logits vs transformers' float32 logits
ROPE_RTOL = 1e-6  # inv_freq / attention factor vs transformers' ROPE_INIT_FUNCTIONS
ANGLE_ATOL = 1e-5  # cos/sin vs a float64 reference, positions up to 131072
