"""Every tolerance of the suite, in one table (STYLE.md habit 6): what is compared, and how close it must be."""

import jax.numpy as jnp

# dtype -> (rtol, atol) for comparing a fast path against the float32 reference
TOL = {
    jnp.float32: (1e-5, 1e-5),
    jnp.bfloat16: (2e-2, 2e-2),
}
HF_LOGITS_ATOL = 1e-4  # our float32 logits vs transformers' float32 logits
EXPORTED_LOGITS_ATOL = 1e-6  # transformers' float32 logits before and after a round trip through our checkpoint
ROPE_RTOL = 1e-6  # inv_freq / attention factor vs transformers' ROPE_INIT_FUNCTIONS
FLOAT64_ATOL = 1e-12  # host float64 arithmetic vs an independent float64 formula (ramps, frequencies)
ANGLE_ATOL = 1e-5  # cos/sin (and rotated vectors) vs a float64 reference, positions up to 131072
# the same float32 model computed two ways (packed vs separate documents, sharded vs one device, remat or
# unrolled layers vs the plain scan): summation order only
REORDER_RTOL, REORDER_ATOL = 1e-5, 1e-5
GRAD_REORDER_RTOL, GRAD_REORDER_ATOL = 1e-5, 1e-6  # their parameter gradients (many near zero)
RECOMPUTE_GRAD_ATOL = 1e-7  # gradients with remat or unrolled layers: the same ops, recomputed or unrolled
LSE_BF16_ATOL = 2e-2  # float32 softmax statistics of bf16 logits vs the float32 reference
HF_LOGITS_RTOL = 1e-4  # our float32 logits vs transformers', relative to the largest logit (the families' check)
