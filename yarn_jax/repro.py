"""The miniature reproduction's corpus, synthetic passkey documents and methods: what its configs
(configs/repro/) and its runner (`python -m yarn_jax.bench reproduce`) share."""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

FACTOR = 8
# the fine-tuned methods: the paper's three, then the ablation of YaRN's two parts (NTK-by-parts
# frequencies, attention temperature sqrt(1/t) = 0.1 ln s + 1): each part without the other
METHODS = {"pi": "PI", "ntk": "NTK-aware", "yarn": "YaRN", "parts": "NTK-by-parts (t = 1)",
           "pi_t": "PI + temperature"}
ABLATION = ("yarn", "parts", "pi_t", "pi")  # YaRN, without its temperature, the temperature without by-parts
HELD_OUT_MIN_BYTES = 48_000  # held-out documents must outlast the longest evaluation length (2 x 4096 tokens)


def corpus(root: str | None = None) -> tuple[list[str], list[str]]:
    """(training files, held-out files): every UTF-8 *.py of at least 500 bytes in the standard library of
    the running Python, recursively (site-packages excluded), sorted; held out: files of at least 48 kB
    whose relative path hashes (CRC-32) to 0 mod 8."""
    import sysconfig

    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in base.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size >= 500
                   and _utf8(p))
    held = [p for p in files if p.stat().st_size >= HELD_OUT_MIN_BYTES
            and zlib.crc32(str(p.relative_to(base)).encode()) % 8 == 0]
    held_set = set(held)
    return [str(p) for p in files if p not in held_set], [str(p) for p in held]


def _utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:  # the tokenizer's tests carry other encodings on purpose
        return False
    return True


PASSKEY_DOCS = 8000  # synthetic passkey documents added to the training data, each within the trained length


def passkey_documents(directory: Path, tokenizer: str, max_tokens: int, n: int = PASSKEY_DOCS) -> list[str]:
    """Writes n short passkey documents (the evaluation's task text, filler, key line at a random depth,
    question, then the answer) of at most `max_tokens` tokens, so that the base model can retrieve a key
    at its own length; evaluation then asks it to do so at up to 16x that length (train short, test long).
    Each document holds 3/4 to all of the filler that fits, the key at a uniform depth: the distance from
    key to question is then spread as at evaluation at `max_tokens` (with 1 to all fillers, over 300 tokens
    in 6% of the documents against 26% of the evaluation's prompts at 512, and a base model retrieved only
    keys near the question). Keys come from a fixed generator, so every seed trains on the same documents;
    returns their paths."""
    import numpy as np

    from yarn_jax.eval import passkey
    from yarn_jax.io import tokenizer as tokenizer_lib

    sp = tokenizer_lib.load(tokenizer, "data.tokenizer")
    fixed = len(sp.encode(" ".join([passkey.TASK, passkey.key_line(99999), passkey.QUESTION, "99999."]))) + 2
    most = (max_tokens - fixed) // len(sp.encode(passkey.FILLER + " "))
    if most < 1:
        raise ValueError(f"data.seq_len: {max_tokens} tokens cannot hold a passkey document")
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    paths = []
    for i in range(n):
        fill, key = int(rng.integers(-(-3 * most // 4), most + 1)), int(rng.integers(10000, 100000))
        at = int(rng.integers(0, fill + 1))
        parts = [passkey.TASK, *[passkey.FILLER] * at, passkey.key_line(key), *[passkey.FILLER] * (fill - at),
                 f"{passkey.QUESTION} {key}."]
        path = directory / f"{i:05d}.txt"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(" ".join(parts))
            tmp.replace(path)
        paths.append(str(path))
    return paths


def finetune_rope(method: str, original: int, factor: float) -> dict[str, Any]:
    """The run config's `rope` for extending a model trained at `original` tokens by `factor`."""
    extended = int(original * factor)
    temperature = 0.1 * math.log(factor) + 1  # YaRN's sqrt(1/t) (paper eq. 22)
    if method in ("pi", "pi_t"):
        return {"rope_type": "linear", "factor": factor, "max_position_embeddings": extended,
                **({"attention_factor": temperature} if method == "pi_t" else {})}
    if method == "ntk":
        return {"rope_type": "ntk", "alpha": factor, "max_position_embeddings": extended}
    if method in ("yarn", "parts"):
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                "max_position_embeddings": extended, **({"attention_factor": 1.0} if method == "parts" else {})}
    raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
