"""Long-context evaluation: sliding-window perplexity (Press et al.) and passkey retrieval, as in the paper.

    python -m yarn_jax.eval perplexity --checkpoint CKPT --data 'docs/*.txt' --lengths 2048,4096 --out DIR
    python -m yarn_jax.eval passkey --checkpoint CKPT --lengths 2048,4096 --trials 10 --out DIR
"""
