"""What goes in and out: Orbax checkpoints, Hugging Face files and their tensor layout, tokenizers,
and the input pipeline."""
