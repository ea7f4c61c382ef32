"""The paper's claims in miniature, end to end, with the project's own commands.

    python -m yarn_jax.bench reproduce --out DIR [--seeds 0,1] [--jobs 2] [--smoke]

Per seed (a separate process each; `--jobs` of them at once share the device):
  1. pretrain configs/repro/pretrain.py (32.5M parameters, GQA, theta 10000, 512 tokens) on the training
     split of the running Python's standard library source (`corpus`) plus short synthetic passkey
     documents (`passkey_documents`: the task at most 512 tokens long, so retrieval is learnt short);
  2. fine-tune it by s = 8 (512 -> 4096) with PI, NTK-aware and YaRN under one budget
     (configs/repro/finetune.py, checkpoints every 25 steps);
  3. evaluate with `python -m yarn_jax.eval`: sliding-window perplexity at 512 .. 8192 (2x the extended
     length) and passkey accuracy at each length, for the three fine-tuned models and, without
     fine-tuning, the base model with plain RoPE, static YaRN, dynamic NTK and dynamic YaRN;
  4. steps to target: truncated perplexity at 4096 of every fine-tuning checkpoint (step 0 = the base
     model with the method's scaling), target = the base model's own truncated perplexity at 512.
Then `report` writes DIR/summary.md (tables, which claims held in every seed), DIR/results.json and
per-seed CSV/JSON/PNG. Everything is deterministic given the seed on one machine and software stack
(XLA deterministic GPU ops; the tokenizer trains on a fixed line sample): two runs of a seed on one H200
give identical losses, perplexities and passkey answers (measured). Every stage resumes: the trainer
restarts from its newest checkpoint and finished evaluations are kept.
The held-out documents (the same for every seed) are never trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from yarn_jax.bench.repro_report import DEPTH_BINS, passkey_accuracy, report
from yarn_jax.repro import FACTOR, METHODS, PASSKEY_DOCS, corpus, finetune_rope, passkey_documents


def _spec(rope: dict[str, Any]) -> str:
    """A run-config rope dict as an eval --rope spec (type:key=value,...)."""
    rest = ",".join(f"{k}={v}" for k, v in rope.items() if k != "rope_type")
    return f"{rope['rope_type']}:{rest}"


# ----------------------------------------------------------------------------------- configurations

def _load_config(name: str, arg: str | None = None):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "configs" / "repro" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"repro_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


SMOKE = {  # a CPU-sized run of the same pipeline, for the test suite
    "model": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, dtype="float32"),
    "pretrain": dict(seq_len=64, batch_size=4, steps=8, save_every=4),
    "finetune": dict(batch_size=2, steps=4, save_every=2),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """How a run departs from the experiment: `smoke` shrinks it to CPU size, `steps_scale` shortens both
    training stages (quick looks), `eval_docs` limits the held-out documents (0: all)."""

    smoke: bool = False
    steps_scale: float = 1.0
    eval_docs: int | None = None

    def flags(self) -> list[str]:
        return [*(["--smoke"] if self.smoke else []), "--steps-scale", str(self.steps_scale),
                *([] if self.eval_docs is None else ["--eval-docs", str(self.eval_docs)])]


def _scale_steps(config, scale: float) -> None:
    t = config.train
    t.save_every = max(1, round(t.save_every * scale))
    t.steps = max(t.save_every, round(t.steps * scale / t.save_every) * t.save_every)
    config.optim.warmup_steps = min(config.optim.warmup_steps, t.steps // 2)


def configs(seed: int, tokenizer: str, opts: Options = Options(),
            extra_sources: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """(pretraining config, {method: fine-tuning config}) for one seed; `extra_sources` join the training data."""
    smoke = opts.smoke
    pre = _load_config("pretrain")
    pre.seed = pre.data.seed = seed
    pre.data.tokenizer = tokenizer
    pre.data.sources = tuple(pre.data.sources) + tuple(extra_sources)
    if smoke:
        s = SMOKE["pretrain"]
        pre.model.update({**SMOKE["model"], "max_position_embeddings": s["seq_len"]})
        pre.data.update(dict(seq_len=s["seq_len"], batch_size=s["batch_size"], tokenizer_vocab=512))
        pre.train.update(dict(steps=s["steps"], save_every=s["save_every"], loss_chunk=s["seq_len"]))
    _scale_steps(pre, opts.steps_scale)
    original = pre.data.seq_len
    fts = {}
    for method in METHODS:
        ft = _load_config("finetune", method)
        ft.seed = ft.data.seed = seed
        ft.data.tokenizer = tokenizer
        ft.data.sources = tuple(ft.data.sources) + tuple(extra_sources)
        ft.rope = finetune_rope(method, original, FACTOR)
        ft.data.seq_len = original * FACTOR
        ft.model.dtype = pre.model.dtype
        if smoke:
            s = SMOKE["finetune"]
            ft.data.update(dict(batch_size=s["batch_size"], tokenizer_vocab=512))
            ft.train.update(dict(steps=s["steps"], save_every=s["save_every"], loss_chunk=original))
        _scale_steps(ft, opts.steps_scale)
        fts[method] = ft
    return pre, fts


# ----------------------------------------------------------------------------------- one seed

def _train(config, workdir: Path) -> dict:
    from yarn_jax.train import Run

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    run = Run(config, str(workdir))
    run.train()
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    last = {r["step"]: r for r in rows}  # a resumed run appends: keep each step's last record
    steady = [r["tokens_per_s"] for s, r in sorted(last.items()) if s >= 2]
    return {"final_loss": last[max(last)]["loss"], "tokens_per_s": statistics.median(steady) if steady else None,
            "wall_s": time.perf_counter() - t0}


def _eval(kind: str, out: Path, args: list[str]) -> list[dict]:
    """Runs `python -m yarn_jax.eval KIND ... --out OUT` (in this process) unless OUT holds its results."""
    from yarn_jax.eval.__main__ import main as eval_main

    result = out / f"{kind}.json"
    if not result.exists():
        code = eval_main([kind, *args, "--out", str(out)])
        if code:
            raise ValueError(f"python -m yarn_jax.eval {kind} {' '.join(args)} exited with {code} (its error above)")
    return json.loads(result.read_text())


def run_seed(out: Path, seed: int, tokenizer: str, opts: Options = Options(), synthetic: tuple[str, ...] = ()) -> dict:
    """Every stage for one seed under OUT/seed<N>; returns (and writes) its results."""
    smoke = opts.smoke
    pre_cfg, ft_cfgs = configs(seed, tokenizer, opts, synthetic)
    root = out / f"seed{seed}"
    results_file = root / "results.json"
    if results_file.exists():
        return json.loads(results_file.read_text())
    original = pre_cfg.data.seq_len
    extended = original * FACTOR
    lengths = [original * 2 ** i for i in range(5)]  # 1x .. 16x: up to twice the extended length
    timings: dict[str, float] = {}
    train = {"pretrain": _train(pre_cfg, root / "pretrain")}
    pre = root / "pretrain" / "checkpoints"
    for method, ft in ft_cfgs.items():
        ft.init_from = str(pre)
        train[method] = _train(ft, root / f"finetune_{method}")
    heldout = corpus()[1]
    ev = {**(EVAL_SMOKE if smoke else EVAL), **({} if opts.eval_docs is None else {"docs": opts.eval_docs})}
    common = ["--tokenizer", tokenizer, "--dtype", pre_cfg.model.dtype]
    data = [*[a for f in heldout for a in ("--data", f)], "--docs", str(ev["docs"])]
    static = {m: _spec(finetune_rope(m, original, FACTOR)) for m in METHODS}
    no_ft = {"Base (plain RoPE)": "none", "YaRN s=8 (no fine-tune)": static["yarn"],
             "Dynamic NTK (no fine-tune)": "dynamic:factor=1",
             "Dynamic YaRN (no fine-tune)": f"dynamic_yarn:original_max_position_embeddings={original}"}
    labels = {("base" if spec == "none" else f"base {spec}"): name for name, spec in no_ft.items()}
    labels.update({m: f"{METHODS[m]} s=8 (fine-tuned)" for m in METHODS})
    base_args = ["--checkpoint", f"base={pre}", *[a for spec in no_ft.values() for a in ("--rope", spec)]]
    ft_args = [a for m in METHODS for a in ("--checkpoint", f"{m}={root / f'finetune_{m}' / 'checkpoints'}")]
    # transformers' protocol, as every table in docs/repro/ was computed (the paper's is eval's default now)
    ppl_args = [*common, *data, "--lengths", ",".join(map(str, lengths)), "--sliding-window", str(ev["stride"]),
                "--min-doc-tokens", str(lengths[-1]), "--batch-size", str(ev["batch_size"]), "--protocol", "hf"]
    t0 = time.perf_counter()
    ppl = [{**r, "model": labels[r["model"]]} for args in (base_args, ft_args)
           for r in _eval("perplexity", root / f"perplexity_{args[1].split('=')[0]}", [*args, *ppl_args])]
    timings["perplexity_s"] = time.perf_counter() - t0
    pk_lengths = [n for n in lengths if n >= ev["passkey_min_length"]]
    # the prompt the synthetic training documents use (one line of whole sentences), not the paper's
    pk_args = [*common, "--lengths", ",".join(map(str, pk_lengths)), "--trials", str(ev["trials"]),
               "--seed", str(seed), "--protocol", "sentences"]
    t0 = time.perf_counter()
    pk = [{**r, "model": labels[r["model"]]} for args in (base_args, ft_args)
          for r in _eval("passkey", root / f"passkey_{args[1].split('=')[0]}", [*args, *pk_args])]
    timings["passkey_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    trunc = [*common, *data, "--truncate", "--min-doc-tokens", str(lengths[-1]), "--batch-size",
             str(ev["batch_size"])]
    target, curves = steps_to_target(root, root / "pretrain" / "checkpoints", ft_cfgs, static, trunc, original,
                                     extended)
    timings["steps_s"] = time.perf_counter() - t0
    results = {"seed": seed, "stride": ev["stride"], "lengths": lengths, "original": original, "extended": extended,
               "train": train, "perplexity": ppl, "passkey": pk, "target": target, "curves": curves,
               **passkey_accuracy(pk),
               "steps_to_target": {m: next((k for k, p in c if p <= target), None) for m, c in curves.items()},
               "timings": timings, "heldout_docs": [str(Path(f).name) for f in heldout], "machine": _machine()}
    _plots(root, results)
    results_file.write_text(json.dumps(results, indent=1))
    return results


def _machine() -> dict[str, str]:
    import platform

    import jax

    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version()}


def steps_to_target(root: Path, base: Path, ft_cfgs: dict[str, Any], static: dict[str, str], trunc: list[str],
                    original: int, extended: int) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """(target, {method: [(step, truncated perplexity at the extended length)]}): the target is the base
    checkpoint's truncated perplexity at its own length; step 0 is the base with each method's scaling
    (`static`: method -> --rope spec), then every saved step of ROOT/finetune_METHOD (`ft_cfgs`)."""
    start = _eval("perplexity", root / "steps_base", ["--checkpoint", f"base={base}", "--rope", "none",
                                                      *[a for spec in static.values() for a in ("--rope", spec)],
                                                      "--lengths", f"{original},{extended}", *trunc])
    target = next(r["perplexity"] for r in start if r["model"] == "base" and r["length"] == original)
    curves = {m: [(0, next(r["perplexity"] for r in start
                           if r["model"] == f"base {spec}" and r["length"] == extended))] for m, spec in static.items()}
    for m, ft in ft_cfgs.items():
        saved = range(ft.train.save_every, ft.train.steps + 1, ft.train.save_every)
        ckpt = root / f"finetune_{m}" / "checkpoints"
        rows = _eval("perplexity", root / f"steps_{m}",
                     [*[a for k in saved for a in ("--checkpoint", f"{k}={ckpt}@{k}")], "--lengths", str(extended),
                      *trunc])
        curves[m] += [(int(r["model"]), r["perplexity"]) for r in rows]
    return target, curves


EVAL = {"stride": 512, "docs": 0, "batch_size": 8, "trials": 50, "passkey_min_length": 512}
EVAL_SMOKE = {"stride": 512, "docs": 1, "batch_size": 2, "trials": 2, "passkey_min_length": 256}


def _plots(root: Path, results: dict) -> None:
    from yarn_jax.eval import plots

    plots.perplexity(results["perplexity"], root / "perplexity.png", f"stride {results['stride']}")
    plots.passkey(results["passkey"], root / "passkey.png", DEPTH_BINS)


# ----------------------------------------------------------------------------------- entry point

def _worker_env(jobs: int) -> dict[str, str]:
    """The workers' environment: deterministic XLA GPU reductions, and a share of the device each."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_gpu_deterministic_ops=true"]).strip()
    if jobs > 1:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / jobs:.2f}"
    return env


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m yarn_jax.bench reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once (each its own process)")
    p.add_argument("--smoke", action="store_true", help="a CPU-sized run of the whole pipeline")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (quick looks)")
    p.add_argument("--eval-docs", type=int, help="evaluate on the first N held-out documents (default: all)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    opts = Options(a.smoke, a.steps_scale, a.eval_docs)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        print(f"error: --seeds: expected comma-separated integers, got {a.seeds!r}", file=sys.stderr)
        return 2
    from yarn_jax.io import tokenizer as tokenizer_lib

    train_files, heldout = corpus()
    if not heldout:
        print("error: the standard library has no held-out document of 48 kB or more", file=sys.stderr)
        return 2
    pretrain = _load_config("pretrain").data
    vocab = 512 if a.smoke else pretrain.tokenizer_vocab
    tokenizer = tokenizer_lib.train_sentencepiece(train_files, vocab, out / "tokenizer")
    trained = EVAL_SMOKE["passkey_min_length"] if a.smoke else pretrain.seq_len
    synthetic = passkey_documents(out / "passkey_train", tokenizer, trained, PASSKEY_DOCS // (30 if a.smoke else 1))
    if a.worker:
        run_seed(out, seeds[0], tokenizer, opts, tuple(synthetic))
        return 0
    cmd = [sys.executable, "-m", "yarn_jax.bench", "reproduce", "--out", str(out), "--worker", *opts.flags()]
    pending, running, failed = list(seeds), [], []
    while pending or running:
        while pending and len(running) < max(1, a.jobs):
            seed = pending.pop(0)
            log = open(out / f"seed{seed}.log", "a")  # noqa: SIM115
            proc = subprocess.Popen([*cmd, "--seeds", str(seed)], env=_worker_env(a.jobs),
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((seed, proc, log))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode:
                failed.append(item[0])
    if failed:
        print(f"error: seeds {failed} failed; see {out}/seed<N>.log (rerun resumes)", file=sys.stderr)
        return 1
    print(report(out, seeds))
    return 0
