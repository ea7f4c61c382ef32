"""The model: its config and execution settings, the Flax decoder, RoPE and the YaRN paper's scalings,
the projections (bf16 or FP8 GEMMs) and the loss."""
