"""python -m yarn_jax.eval {perplexity,passkey} ... (see --help of each)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from yarn_jax import cli

COMMON_HELP = "model sources: any number of --checkpoint and --hf; each --rope spec adds a variant of each"


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m yarn_jax.eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    for name in ("perplexity", "passkey"):
        s = sub.add_parser(name, description=COMMON_HELP)
        s.add_argument("--checkpoint", action="append", default=[],
                       help="[LABEL=]PATH[@STEP]: an Orbax checkpoint (newest step unless @STEP)")
        s.add_argument("--hf", action="append", default=[], help="[LABEL=]PATH: a Hugging Face directory")
        s.add_argument("--rope", action="append", default=[],
                       help="e.g. yarn:factor=8,original_max_position_embeddings=512 (max_position_embeddings "
                            "and rope_theta allowed too); 'none' keeps the model's own")
        s.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one (default: "
                                           "the first model's own: a checkpoint's or an --hf directory's)")
        s.add_argument("--lengths", required=True, type=cli.int_list, help="comma-separated context lengths in tokens")
        s.add_argument("--out", required=True, help="directory for the .csv, .json and .png results")
        s.add_argument("--dtype", default="bfloat16", help="compute dtype (float32, bfloat16, float16)")
        s.add_argument("--mesh", default="", help="e.g. seq=4 or data=2,seq=4 (default: one device)")
        s.add_argument("--batch-size", type=cli.count(1), default=1, help="windows or prompts per forward")
    ppl = sub.choices["perplexity"]
    ppl.add_argument("--data", action="append", required=True, help="files or globs")
    ppl.add_argument("--format", default="text", choices=["text", "jsonl", "parquet", "arrayrecord"],
                     help="how --data holds documents")
    ppl.add_argument("--field", default="text", help="the JSONL / Parquet / ArrayRecord field holding the text")
    ppl.add_argument("--sliding-window", type=cli.count(1), default=256, help="stride S of the sliding window")
    ppl.add_argument("--truncate", action="store_true", help="score each document cut to the length instead")
    ppl.add_argument("--protocol", choices=["yarn", "hf"], default="yarn",
                     help="yarn: the paper's code (BOS + length-1 tokens per window, exp of the mean of window "
                          "means); hf: transformers' (BOS once per document, exp of total NLL / tokens)")
    ppl.add_argument("--docs", type=cli.count(0), default=0, help="use the first N documents (0: all)")
    ppl.add_argument("--min-doc-tokens", type=cli.count(0), default=0, help="skip shorter documents")
    pk = sub.choices["passkey"]
    pk.add_argument("--trials", type=cli.count(1), default=10, help="prompts per length")
    pk.add_argument("--protocol", choices=["yarn", "sentences"], default="yarn",
                    help="yarn: the paper's prompt (five lines, filler cut by characters, keys 1..50000); "
                         "sentences: one line of whole filler sentences, 5-digit keys")
    pk.add_argument("--seed", type=cli.count(0), default=0, help="draws the keys and depths")
    pk.add_argument("--depth-bins", type=cli.count(1), default=5, help="rows of the depth heat map")
    return p


def _rope(spec: str) -> dict[str, Any]:
    if spec == "none":
        return {}
    kind, _, rest = spec.partition(":")
    out: dict[str, Any] = {"rope_type": kind}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = value.lower() == "true" if value.lower() in ("true", "false") else float(value)
        except ValueError:
            raise ValueError(f"--rope {spec}: {key}: expected a number or true/false, got {value!r}") from None
    return out


def _mesh(spec: str) -> dict[str, int]:
    """'data=2,seq=4' -> {'data': 2, 'seq': 4}."""
    try:
        return {k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
    except ValueError:
        raise ValueError(f"--mesh: expected AXIS=SIZE[,AXIS=SIZE...], e.g. seq=4, got {spec!r}") from None


def models(args) -> tuple[list[tuple[str, Any, Any]], Any]:
    """([(label, cfg, params) for every source x rope variant], mesh or None)."""
    from yarn_jax import convert, sharding
    from yarn_jax.io import checkpoint
    from yarn_jax.model.config import LlamaConfig, with_rope

    ropes = [(spec, _rope(spec)) for spec in args.rope or ["none"]]  # bad specs fail before any loading
    mesh = sharding.make_mesh(**_mesh(args.mesh)) if args.mesh else None
    bases = []
    for spec in args.checkpoint:
        path, step = _checkpoint_path(spec)
        cfg, params = checkpoint.load_checkpoint(path, mesh, step=step, dtype=args.dtype)
        bases.append((_source(spec)[0] or Path(path).name + (f"@{step}" if step is not None else ""), cfg, params))
    for spec in args.hf:
        label, path = _source(spec)
        cfg, params = convert.load_hf(path, dtype=args.dtype)
        bases.append((label or Path(path).name, cfg, params))
    if not bases:
        raise ValueError("give at least one --checkpoint or --hf")
    out = []
    for label, cfg, params in bases:
        if mesh is None:  # onto the default device once, not at every call
            import jax

            params = jax.device_put(params)
        for spec, rope in ropes:
            hf = with_rope(cfg.to_hf(), rope)
            variant = LlamaConfig.from_hf(hf).replace(execution=cfg.execution)
            out.append((label if spec == "none" else f"{label} {spec}", variant, params))
    return out, mesh


def _checkpoint_path(spec: str) -> tuple[str, int | None]:
    """'[LABEL=]PATH[@STEP]' -> (PATH, STEP or None)."""
    path = _source(spec)[1]
    path, _, step = path.rpartition("@") if "@" in Path(path).name else (path, "", "")
    if step and not step.isdigit():
        raise ValueError(f"--checkpoint {spec}: expected PATH@STEP with an integer step, got {step!r}")
    return path, int(step) if step else None


def _source(spec: str) -> tuple[str, str]:
    """'LABEL=PATH' -> (LABEL, PATH); 'PATH' -> ('', PATH)."""
    label, sep, path = spec.partition("=")
    return (label, path) if sep and "/" not in label else ("", spec)


def _tokenizer(args, cfgs):
    from yarn_jax.io import checkpoint
    from yarn_jax.io import tokenizer as tokenizer_lib

    sources = [(f"--checkpoint {spec}", checkpoint.tokenizer_of(_checkpoint_path(spec)[0]))
               for spec in args.checkpoint] + [(f"--hf {spec}", Path(_source(spec)[1])) for spec in args.hf]
    tok = tokenizer_lib.resolve(args.tokenizer, sources)
    for cfg in cfgs:
        tok.check_fits(cfg.vocab_size, "--tokenizer")
    return tok


def _write(out: Path, name: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))


def run_perplexity(args) -> list[dict]:
    from tqdm import tqdm

    from yarn_jax.eval import perplexity, plots
    from yarn_jax.io import data

    lengths = args.lengths
    out = cli.check_writable(args.out, "--out")  # before the evaluation whose results it holds
    variants, mesh = models(args)
    tok = _tokenizer(args, [c for _, c, _ in variants])
    texts = data.read_documents(tuple(args.data), args.format, args.field)
    texts = texts[:args.docs] if args.docs else texts
    docs = [np.asarray(tok.with_bos(tok.encode(t)), np.int32) for t in texts]
    bos = tok.bos_id is not None
    stride = None if args.truncate else args.sliding_window
    protocol = perplexity.Protocol(args.protocol)
    for n in lengths:  # fail before any model runs
        perplexity.plan(docs, n, stride, args.min_doc_tokens, protocol, bos)
    rows = []
    total = sum(len(perplexity.plan(docs, n, stride, args.min_doc_tokens, protocol, bos))
                for n in lengths) * len(variants)
    with tqdm(total=total, desc="windows", dynamic_ncols=True) as bar:
        for label, cfg, params in variants:
            for n in lengths:
                r = perplexity.evaluate(cfg, params, docs, n, stride=stride, min_doc_tokens=args.min_doc_tokens,
                                        batch_size=args.batch_size, mesh=mesh, progress=bar, protocol=protocol,
                                        bos=bos)
                rows.append({"model": label, "length": n, **r, "protocol": "truncate" if args.truncate
                             else protocol.value})
                bar.write(f"{label} @ {n}: perplexity {r['perplexity']:.4f} over {int(r['tokens'])} tokens")
    _write(out, "perplexity", rows)
    plots.perplexity(rows, out / "perplexity.png", "truncated" if args.truncate else f"stride {args.sliding_window}")
    return rows


def run_passkey(args) -> list[dict]:
    from tqdm import tqdm

    from yarn_jax import generate
    from yarn_jax.eval import passkey, plots

    lengths = args.lengths
    out = cli.check_writable(args.out, "--out")
    variants, mesh = models(args)
    tok = _tokenizer(args, [c for _, c, _ in variants])
    trial_list = passkey.trials(tok.encode, tok.bos_id, lengths, args.trials, args.seed,
                                passkey.Protocol(args.protocol))
    rows = []
    with tqdm(total=len(trial_list) * len(variants), desc="passkey", dynamic_ncols=True) as bar:
        for label, cfg, params in variants:
            def answer(prompts, cfg=cfg, params=params):  # one batch, each prompt its own length
                new = generate.complete(cfg, params, prompts, passkey.ANSWER_TOKENS, eos_id=tok.eos_id, mesh=mesh)
                return [tok.decode([int(x) for x in row]) for row in new]

            rows += [{"model": label, **r} for r in passkey.score(trial_list, answer, args.batch_size, bar)]
    _write(out, "passkey", rows)
    plots.passkey(rows, out / "passkey.png", args.depth_bins)
    for label in dict.fromkeys(r["model"] for r in rows):
        per_length, _, _ = passkey.accuracy([r for r in rows if r["model"] == label], args.depth_bins)
        print(label, {n: f"{a:.0%}" for n, a in per_length.items()})
    return rows


def main(argv: list[str] | None = None) -> int:
    def job() -> int:
        args = _parser().parse_args(argv)  # inside cli.run: argparse's refusal is a return status too
        (run_perplexity if args.command == "perplexity" else run_passkey)(args)
        return 0

    return cli.run(job)


if __name__ == "__main__":
    sys.exit(main())
