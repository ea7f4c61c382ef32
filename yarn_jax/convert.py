"""Hugging Face <-> Orbax conversion, both ways, one tensor at a time, with atomic output.

    python -m yarn_jax.convert from-hf HF_DIR CKPT_DIR [--dtype bfloat16] \
        [--rope-type yarn --factor 16 --original-max-position-embeddings 4096 --max-position-embeddings 65536]
    python -m yarn_jax.convert to-hf CKPT_DIR HF_DIR [--step N] [--dtype bfloat16] [--max-shard-size 5GB] \
        [--tokenizer tokenizer.model|tokenizer.json|DIR]

The tokenizer travels with the weights: from-hf copies the HF directory's into CKPT_DIR/tokenizer, to-hf
writes the checkpoint's (or --tokenizer's) as AutoTokenizer reads it.

Output goes to a temporary sibling directory renamed into place on success: a failure, SIGTERM or Ctrl-C
leaves nothing behind and never touches the input. An output that is, contains or lies inside an input is
refused; an existing output is an error unless --overwrite, which replaces only a directory an earlier
conversion wrote (it holds the MARKER file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from yarn_jax import cli
from yarn_jax.io import checkpoint, hf_files, hf_layout
from yarn_jax.io import tokenizer as tokenizer_lib
from yarn_jax.model import scaling as scaling_lib
from yarn_jax.model.config import LlamaConfig, with_rope
from yarn_jax.model.execution import DTYPES


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Removes the hidden `.NAME.tmp-PID-*` / `.NAME.old-PID` directories that a killed conversion (kill -9,
    a lost machine) left next to `out`; those of a conversion still running are left alone."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = stale.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


MARKER = ".yarn_jax_convert"  # in every directory `convert` writes: what --overwrite may replace


def check_output(out: str | Path, inputs: list[str | Path], overwrite: bool) -> Path:
    """`out` as an absolute path, refused (ValueError naming it) when it is, contains or lies inside one
    of `inputs` (whatever --overwrite says), or exists and is not a directory this command wrote before
    (--overwrite replaces only a directory holding MARKER). Checked before anything is read or written."""
    out = Path(out).expanduser().absolute()
    real = out.resolve()
    for inp in inputs:
        src = Path(inp).expanduser().resolve()
        if real == src or src.is_relative_to(real) or real.is_relative_to(src):
            relation = "is" if real == src else "contains" if src.is_relative_to(real) else "lies inside"
            raise ValueError(f"{out}: the output directory {relation} the input {src}; choose an output "
                             "outside it (nothing was written)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ValueError(f"{out}: output directory exists; pass --overwrite to replace it")
        if not out.is_dir() or not (out / MARKER).is_file():
            raise ValueError(f"{out}: --overwrite replaces only a directory written by yarn_jax.convert (it "
                             f"holds {MARKER}); this one was not: remove it yourself or choose another output")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, inputs: list[str | Path] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `out`; renames it to `out` only if the block succeeds
    (a failure, a full disk or a signal included, leaves any previous `out` as it was). `out` is checked
    against `inputs` and --overwrite first (`check_output`). The result holds MARKER and gets the
    process's normal permissions (umask), not the temporary directory's 0700."""
    out = check_output(out, list(inputs), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("written by python -m yarn_jax.convert; --overwrite may replace it\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _target_dtype(dtype: str | None) -> np.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return np.dtype(DTYPES[dtype])


def read_hf_config(hf_dir: Path, rope: dict[str, Any] | None = None) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        orbax = any(p.name.isdigit() and (p / "config").is_dir() for p in Path(hf_dir).glob("*"))
        raise ValueError(f"{path}: missing (an HF model directory needs config.json)"
                         + ("; this looks like an Orbax checkpoint? use --checkpoint" if orbax else ""))
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return with_rope(hf, rope or {})


def _check_names(cfg: LlamaConfig, weights: hf_files.HfWeights) -> None:
    expected, present = set(hf_layout.hf_names(cfg)), weights.names()
    missing = sorted(expected - present)
    if "lm_head.weight" in missing:
        raise ValueError(f"{weights.dir}: tensor lm_head.weight is missing while tie_word_embeddings is false")
    if missing:
        raise ValueError(f"{weights.dir}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(present - expected - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unexpected:
        raise ValueError(f"{weights.dir}: unexpected tensors {unexpected[:5]} for a {cfg.family.value} model of "
                         "this config")


def from_hf(hf_dir: str | Path, ckpt_dir: str | Path, *, dtype: str | None = None,
            rope: dict[str, Any] | None = None, overwrite: bool = False) -> LlamaConfig:
    """HF directory -> Orbax checkpoint (step 0), written one HF tensor (one layer) at a time into
    per-layer chunks (checkpoint.save_params_streamed), so memory stays near one stacked parameter. The
    directory's tokenizer (tokenizer.json or tokenizer.model), when it has one, goes with it."""
    hf_dir = Path(hf_dir)
    cfg = LlamaConfig.from_hf(read_hf_config(hf_dir, rope))
    tok = tokenizer_lib.load(hf_dir, str(hf_dir)) if tokenizer_lib.find(hf_dir) else None
    if tok is not None:
        tok.check_fits(cfg.vocab_size, str(tok.path))
    target = _target_dtype(dtype)
    weights = hf_files.HfWeights(hf_dir)
    _check_names(cfg, weights)

    def source(t: hf_layout.Tensor) -> checkpoint.LeafSource:
        names = hf_layout.names_of(t, cfg)
        for name in names:  # every shape checked before anything is written
            hf_layout.check_hf_shape(t, name, weights.get(name))
        stored = target or weights.get(names[0]).dtype

        def fill(i: int | None) -> np.ndarray:  # one HF tensor, read from its memory map
            return np.ascontiguousarray(t.to_ours(weights.get(names[0 if i is None else i])), dtype=stored)

        shape = ((cfg.num_layers,) if t.per_layer else ()) + t.shape
        return checkpoint.LeafSource(t.path, shape, stored, t.per_layer, fill)

    leaves = [source(t) for t in hf_layout.layout(cfg)]
    with atomic_dir(ckpt_dir, [hf_dir], overwrite) as out:
        checkpoint.save_params_streamed(out, cfg, leaves)
        if tok is not None:
            checkpoint.save_tokenizer(out, tok)
    return cfg


def to_hf(ckpt_dir: str | Path, hf_dir: str | Path, *, step: int | None = None, dtype: str | None = None,
          max_shard_size: str = "5GB", tokenizer: str | Path | None = None, overwrite: bool = False) -> LlamaConfig:
    """Orbax checkpoint (converter's or trainer's) -> HF directory loadable by transformers with YaRN on,
    with the checkpoint's tokenizer (or `tokenizer`, which overrides it) as AutoTokenizer reads it."""
    target = _target_dtype(dtype)
    max_bytes = hf_files.parse_size(max_shard_size)
    reader = checkpoint.Reader(ckpt_dir, step)
    cfg, stored = reader.cfg, reader.metadata()
    tok = tokenizer_lib.load(tokenizer) if tokenizer else None
    if tok is None and checkpoint.tokenizer_of(ckpt_dir):
        tok = tokenizer_lib.load(checkpoint.tokenizer_of(ckpt_dir), str(ckpt_dir))
    if tok is not None:
        tok.check_fits(cfg.vocab_size, "--tokenizer")
    tensors = hf_layout.layout(cfg)
    specs = [(name, t.hf_shape, target or hf_layout.get_path(stored, t.path).dtype)
             for t in tensors for name in hf_layout.names_of(t, cfg)]

    def arrays() -> Iterator[np.ndarray]:
        for t in tensors:
            for w in reader.slices(t.path, t.per_layer):  # one layer at a time
                yield t.to_hf(w).astype(target or w.dtype, copy=False)
            del w
            checkpoint.release_freed_memory()

    with atomic_dir(hf_dir, [ckpt_dir] + ([tokenizer] if tokenizer else []), overwrite) as out:
        hf_files.write_weights(out, specs, arrays(), max_bytes)
        write_hf_metadata(out, cfg, specs[0][2], tok)
    reader.close()
    return cfg


def transformers_config(cfg: LlamaConfig) -> dict[str, Any]:
    """cfg.to_hf() in a form transformers can run: static NTK becomes plain RoPE with the changed base
    (the same frequencies); dynamic_yarn and PI with an attention factor, which transformers lacks, are
    refused."""
    hf = cfg.to_hf()
    if isinstance(cfg.rope_scaling, scaling_lib.Linear) and cfg.rope_scaling.attention_factor is not None:
        raise ValueError("rope_scaling.attention_factor: transformers' linear scaling has none; this model "
                         "(PI with a temperature, an ablation) loads with yarn_jax only")
    if isinstance(cfg.rope_scaling, scaling_lib.NTK):
        h = cfg.head_dim
        hf.update(rope_scaling=None, rope_theta=cfg.rope_theta * cfg.rope_scaling.alpha ** (h / (h - 2)))
    elif isinstance(cfg.rope_scaling, scaling_lib.DynamicYarn):
        raise ValueError("rope_scaling: dynamic_yarn has no transformers equivalent; export with a static "
                         "scaling (from-hf --rope-type yarn --factor S) or load the weights with yarn_jax")
    return hf


def write_hf_metadata(out: Path, cfg: LlamaConfig, dtype: Any, tok: tokenizer_lib.Tokenizer | None) -> None:
    """config.json, generation_config.json and, when given, the tokenizer's files."""
    hf = {**transformers_config(cfg), "torch_dtype": np.dtype(dtype).name}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tok is not None:
        tok.save(out)


# ----------------------------------------------------------------------------- in-memory API


def load_hf(path: str | Path, **execution: Any) -> tuple[LlamaConfig, dict[str, Any]]:
    """(cfg, params as numpy) from an HF directory; `execution`: fields of the config's `Execution`."""
    cfg = LlamaConfig.from_hf(read_hf_config(Path(path)), **execution)
    weights = hf_files.HfWeights(Path(path))
    _check_names(cfg, weights)
    return cfg, hf_layout.params_from_hf(cfg, weights.get)


def save_hf(cfg: LlamaConfig, params: Any, path: str | Path, *, max_shard_size: str = "5GB",
            tokenizer: str | Path | None = None, overwrite: bool = False) -> None:
    """Writes `params` (any arrays) as an HF directory for the family's transformers class (LlamaForCausalLM, ...)."""
    pairs = list(hf_layout.params_to_hf(cfg, params))
    specs = [(name, a.shape, a.dtype) for name, a in pairs]
    tok = tokenizer_lib.load(tokenizer) if tokenizer else None
    with atomic_dir(path, [tokenizer] if tokenizer else [], overwrite) as out:
        hf_files.write_weights(out, specs, (a for _, a in pairs), hf_files.parse_size(max_shard_size))
        write_hf_metadata(out, cfg, specs[0][2], tok)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m yarn_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    a = sub.add_parser("from-hf", help="HF directory -> Orbax checkpoint")
    a.add_argument("hf_dir", help="a Hugging Face model directory (config.json, safetensors or .bin, tokenizer)")
    a.add_argument("ckpt_dir", help="the Orbax checkpoint to write (step 0, with the tokenizer)")
    a.add_argument("--dtype", choices=sorted(DTYPES), help="stored dtype (default: as in the HF files)")
    a.add_argument("--overwrite", action="store_true", help="replace a directory an earlier conversion wrote")
    g = a.add_argument_group("rope scaling written into the checkpoint's config")
    g.add_argument("--rope-type", choices=["default", "linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "llama3"],
                   help="replaces the model's scaling (without it, the flags below update it)")
    for flag in ("factor", "alpha", "beta-fast", "beta-slow", "mscale", "mscale-all-dim", "attention-factor",
                 "rope-theta"):
        g.add_argument(f"--{flag}", type=float, help=f"rope_scaling's {flag.replace('-', '_')}")
    g.add_argument("--original-max-position-embeddings", type=int, help="the trained length (default: the model's)")
    g.add_argument("--max-position-embeddings", type=int, help="the extended length")
    g.add_argument("--truncate", choices=["true", "false"], help="yarn: round the ramp's ends (transformers')")
    g.add_argument("--finetuned", choices=["true", "false"], help="dynamic_yarn: the model was fine-tuned")
    b = sub.add_parser("to-hf", help="Orbax checkpoint -> HF directory")
    b.add_argument("ckpt_dir", help="an Orbax checkpoint (convert's, or a trainer's WORKDIR/checkpoints)")
    b.add_argument("hf_dir", help="the Hugging Face directory to write")
    b.add_argument("--step", type=int, help="the step to export (default: the newest)")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="written dtype (default: as stored)")
    b.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (GB = 1e9, GiB = 2^30)")
    b.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one (default: the "
                                       "checkpoint's own)")
    b.add_argument("--overwrite", action="store_true", help="replace a directory an earlier conversion wrote")
    return p


def main(argv: list[str] | None = None) -> int:
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax's deprecation and tuning warnings, a dozen per leaf
    with cli.interruptible():  # SIGTERM as Ctrl-C: the temporary output is removed, one line, status 130
        return cli.run(lambda: _run(_parser().parse_args(argv)))


def _run(args) -> int:
    if args.command == "from-hf":
        rope = {k: getattr(args, k) for k in ("rope_type", "factor", "alpha", "beta_fast", "beta_slow", "mscale",
                                              "mscale_all_dim", "attention_factor", "rope_theta",
                                              "original_max_position_embeddings", "max_position_embeddings")}
        for k in ("truncate", "finetuned"):
            if getattr(args, k) is not None:
                rope[k] = getattr(args, k) == "true"
        cfg = from_hf(args.hf_dir, args.ckpt_dir, dtype=args.dtype, rope=rope, overwrite=args.overwrite)
        print(f"wrote {args.ckpt_dir}: {cfg.num_params():,} parameters, rope {cfg.rope_scaling}")
    else:
        cfg = to_hf(args.ckpt_dir, args.hf_dir, step=args.step, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"wrote {args.hf_dir}: {cfg.num_params():,} parameters, rope {cfg.rope_scaling}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
