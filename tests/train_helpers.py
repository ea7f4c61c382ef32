"""A tiny, fast run configuration for trainer tests (real corpus: a few stdlib files)."""

import json
from pathlib import Path

from yarn_jax import run_config
from yarn_jax.io import data

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str = "tiny"):
    return run_config.load(str(ROOT / "configs" / f"{name}.py"), [])


def corpus() -> list[str]:
    return data.stdlib_corpus()[20:32]


def tiny_run_config(cache_dir: Path, **train):
    c = load_config()
    c.model.update(dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=16, max_position_embeddings=256))
    c.rope.original_max_position_embeddings = 32
    c.data.update(dict(sources=tuple(corpus()), tokenizer_vocab=512, cache_dir=str(cache_dir), seq_len=64, batch_size=4,
                       skip_docs=0))
    c.train.update({**dict(steps=6, save_every=3, loss_chunk=32), **train})
    c.mesh.update(dict(data=1, fsdp=4, seq=2, tensor=1))  # the 8 fake CPU devices; ring attention over 2
    return c


def losses(workdir: Path) -> list[tuple[int, float, str]]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["batch_hash"]) for r in rows]
