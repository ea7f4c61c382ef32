"""Tokenizers behind one small interface: a SentencePiece `.model` (Llama 2, Mistral 7B) or a Hugging Face
`tokenizer.json` read by the `tokenizers` library (Llama 3, Qwen2.5, Qwen3, SmolLM2, Mistral NeMo).

    tok = tokenizer.load(path)   # a .model file, a tokenizer.json, or a directory holding either
    ids = tok.encode(text)       # no special tokens; tok.bos_id (None: none) goes first, tok.eos_id last

BOS and EOS as `transformers` decides for the model: a SentencePiece model adds its BOS; a `tokenizer.json`
adds a BOS only when its post-processor puts one in front (Llama 3 does, Qwen does not: transformers 5's
fast tokenizers decide by the post-processor alone). EOS is tokenizer_config.json's `eos_token`, else the
`eos_token_id` of generation_config.json or config.json beside it. `save` writes the files that
`transformers.AutoTokenizer.from_pretrained` needs; a checkpoint keeps its tokenizer that way
(`checkpoint.TOKENIZER`). `train_sentencepiece` trains (once, cached) the model a run without a
tokenizer uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from yarn_jax.cli import one_line

SPM, HF_JSON, HF_CONFIG = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")  # copied with a tokenizer.json when present


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """One tokenizer: `encode` / `decode` without special tokens, the BOS to put first (None: the model's
    tokenizer adds none), the EOS that ends a document and stops generation, the vocabulary size."""

    path: Path  # the tokenizer file (tokenizer.model or tokenizer.json)
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    backend: Any = dataclasses.field(repr=False, compare=False)

    @property
    def is_sentencepiece(self) -> bool:
        return self.path.suffix != ".json"

    def encode(self, text: str) -> list[int]:
        if self.is_sentencepiece:
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.is_sentencepiece:
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=True)

    def with_bos(self, ids: list[int]) -> list[int]:
        """ids with the BOS in front when the tokenizer has one (a prompt, an evaluation window)."""
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def fingerprint(self) -> str:
        """A hash of what encoding depends on (pieces, merges, normalisation, special ids), equal for the
        same tokenizer wherever it lies; a SentencePiece model by its pieces and scores only (the file also
        records the paths it was trained under)."""
        sp = self.backend
        if self.is_sentencepiece:
            pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
            content: Any = [pieces, [sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()]]
        else:
            content = [json.loads(sp.to_str()), self.bos_id, self.eos_id]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def check_fits(self, vocab_size: int, field: str) -> None:
        """Refuses a tokenizer with more ids than the model has embeddings (not this model's tokenizer)."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{field}: vocabulary of {self.vocab_size} tokens is larger than the model's vocab_size "
                             f"({vocab_size}): {self.path} is not this model's tokenizer")

    def save(self, directory: Path) -> None:
        """The tokenizer's files into `directory` (existing), as `AutoTokenizer.from_pretrained` reads them:
        tokenizer.model or tokenizer.json, and a tokenizer_config.json (the original's when it has one)."""
        directory = Path(directory)
        shutil.copyfile(self.path, directory / (SPM if self.is_sentencepiece else HF_JSON))
        for name in COMPANIONS:
            if (self.path.parent / name).is_file():
                shutil.copyfile(self.path.parent / name, directory / name)
        if (directory / HF_CONFIG).exists():
            return
        piece = (lambda i: self.backend.id_to_piece(i)) if self.is_sentencepiece else self.backend.id_to_token
        config = {"tokenizer_class": "LlamaTokenizer" if self.is_sentencepiece else "PreTrainedTokenizerFast",
                  "bos_token": None if self.bos_id is None else piece(self.bos_id),
                  "eos_token": None if self.eos_id is None else piece(self.eos_id),
                  "add_bos_token": self.bos_id is not None, "add_eos_token": False}
        (directory / HF_CONFIG).write_text(json.dumps(config, indent=2))


TRAIN_LINES = 200_000  # lines the tokenizer is trained on
# LLaMA's choices: every digit its own piece (a number tokenizes the same wherever it stands, so copying
# it is copying pieces), nearly every character covered, bytes for the rest
TRAIN_SETTINGS = dict(model_type="bpe", split_digits=True, character_coverage=0.99995, byte_fallback=True)


def train_sentencepiece(files: list[str], vocab_size: int, cache_dir: str | Path) -> str:
    """Trains a SentencePiece BPE model on `files` once and caches it by file list, size and settings."""
    import sentencepiece as spm

    # the sample size and settings are in the key: models cached under other ones are not reused
    key = hashlib.sha256(json.dumps([files, vocab_size, TRAIN_LINES, TRAIN_SETTINGS]).encode()).hexdigest()[:16]
    model = Path(cache_dir).expanduser() / f"spm_{vocab_size}_{key}.model"
    if model.exists():
        return str(model)
    model.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = model.with_name(f".{model.stem}.{os.getpid()}")
    texts = (Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    # SentencePiece's own line sampling differs between processes even when seeded, so the sample is ours:
    # at most TRAIN_LINES lines, chosen by a fixed generator, kept in corpus order.
    if len(lines) > TRAIN_LINES:
        keep = np.sort(np.random.default_rng(0).choice(len(lines), TRAIN_LINES, replace=False))
        lines = [lines[i] for i in keep]
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_prefix),
                                       vocab_size=vocab_size, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                       input_sentence_size=0, shuffle_input_sentence=False, num_threads=2,
                                       minloglevel=2, **TRAIN_SETTINGS)
    except RuntimeError as e:  # SentencePiece's own checks (too little text for the vocabulary, ...)
        most = re.search(r"value <= (\d+)", str(e))
        reason = (f"the sources give at most {most.group(1)} pieces; lower it or add text" if most
                  else one_line(str(e))[:200])
        raise ValueError(f"data.tokenizer_vocab: cannot train a SentencePiece model of {vocab_size} pieces on "
                         f"{len(files)} files ({reason})") from None
    os.replace(f"{tmp_prefix}.model", model)
    os.remove(f"{tmp_prefix}.vocab")
    return str(model)


def find(path: str | Path) -> Path | None:
    """The tokenizer file of a directory (tokenizer.json before tokenizer.model), or None."""
    for name in (HF_JSON, SPM):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def resolve(explicit: str | Path | None, sources: list[tuple[str, Path | None]], field: str = "--tokenizer"
            ) -> Tokenizer:
    """`explicit` when given, else the first of `sources` ((what it is, the directory it carries its tokenizer
    in, or None)) that has one; none: a ValueError naming `field` and the sources."""
    if explicit:
        return load(explicit, field)
    for _, directory in sources:
        if directory is not None and find(directory) is not None:
            return load(directory, field)
    named = ", ".join(what for what, _ in sources) or "no model"
    raise ValueError(f"{field}: required: {named} carries no tokenizer ({HF_JSON} or {SPM})")


def load(path: str | Path, field: str = "--tokenizer") -> Tokenizer:
    """The tokenizer at `path`: a SentencePiece model, a tokenizer.json, or a directory holding one (an HF
    model, a checkpoint's tokenizer). Anything else is a ValueError naming `field` and the file."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = find(path)
        if found is None:
            raise ValueError(f"{field}: {path} is a directory without {HF_JSON} or {SPM}")
        path = found
    elif not path.is_file():
        raise ValueError(f"{field}: {path} does not exist")
    if path.suffix == ".json":
        return _load_hf(path, field)
    return _load_spm(path, field)


def _load_spm(path: Path, field: str) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        reason = str(e).splitlines()[0][:120]
        raise ValueError(f"{field}: {path} is neither a SentencePiece model nor a Hugging Face tokenizer.json "
                         f"({reason})") from None
    return Tokenizer(path, sp.get_piece_size(), sp.bos_id() if sp.bos_id() >= 0 else None,
                     sp.eos_id() if sp.eos_id() >= 0 else None, sp)


def _load_hf(path: Path, field: str) -> Tokenizer:
    from tokenizers import Tokenizer as HfTokenizer

    try:
        tok = HfTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  the tokenizers library raises a bare Exception for a bad file
        reason = " ".join(str(e).split())[:120]
        raise ValueError(f"{field}: {path} is not a Hugging Face tokenizer.json ({reason})") from None
    plain, special = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    front = special[:special.index(plain[0])] if plain and plain[0] in special else []
    bos = front[0] if len(front) == 1 else None  # what the post-processor puts in front
    return Tokenizer(path, tok.get_vocab_size(with_added_tokens=True), bos, _hf_eos(tok, path.parent), tok)


def _hf_eos(tok: Any, directory: Path) -> int | None:
    """tokenizer_config.json's eos_token, else generation_config.json's / config.json's eos_token_id."""
    config = _json(directory / HF_CONFIG)
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and tok.token_to_id(eos) is not None:
        return tok.token_to_id(eos)
    for name in ("generation_config.json", "config.json"):
        ids = _json(directory / name).get("eos_token_id")
        ids = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(ids, int):
            return ids
    return None


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}
