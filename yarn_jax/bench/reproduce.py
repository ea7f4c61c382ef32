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

from yarn_jax.repro import ABLATION, FACTOR, METHODS, PASSKEY_DOCS, corpus, finetune_rope, passkey_documents


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
            raise RuntimeError(f"python -m yarn_jax.eval {kind} {' '.join(args)} exited with {code}")
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
    # steps to target: truncated perplexity at the extended length along each fine-tuning run
    t0 = time.perf_counter()
    trunc = [*common, *data, "--truncate", "--min-doc-tokens", str(lengths[-1]), "--batch-size",
             str(ev["batch_size"])]
    start = _eval("perplexity", root / "steps_base", ["--checkpoint", f"base={pre}", "--rope", "none",
                                                      *[a for m in METHODS for a in ("--rope", static[m])],
                                                      "--lengths", f"{original},{extended}", *trunc])
    target = next(r["perplexity"] for r in start if r["model"] == "base" and r["length"] == original)
    curves = {m: [(0, next(r["perplexity"] for r in start
                           if r["model"] == f"base {static[m]}" and r["length"] == extended))] for m in METHODS}
    for m, ft in ft_cfgs.items():
        saved = range(ft.train.save_every, ft.train.steps + 1, ft.train.save_every)
        ckpt = root / f"finetune_{m}" / "checkpoints"
        rows = _eval("perplexity", root / f"steps_{m}",
                     [*[a for k in saved for a in ("--checkpoint", f"{k}={ckpt}@{k}")], "--lengths", str(extended),
                      *trunc])
        curves[m] += [(int(r["model"]), r["perplexity"]) for r in rows]
    timings["steps_s"] = time.perf_counter() - t0
    steps_to_target = {m: next((k for k, p in c if p <= target), None) for m, c in curves.items()}
    import platform

    import jax

    machine = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version()}
    from yarn_jax.eval.passkey import accuracy

    by_model = {label: [r for r in pk if r["model"] == label] for label in dict.fromkeys(r["model"] for r in pk)}
    results = {"seed": seed, "stride": ev["stride"], "lengths": lengths, "original": original, "extended": extended,
               "train": train,
               "perplexity": ppl, "passkey": pk, "target": target, "curves": curves,
               "passkey_accuracy": {label: accuracy(rows)[0] for label, rows in by_model.items()},
               "passkey_by_depth": {label: {"depth_bins": DEPTH_BINS, "lengths": accuracy(rows, DEPTH_BINS)[2],
                                            "accuracy": [[None if v != v else v for v in row]  # NaN: no trial
                                                         for row in accuracy(rows, DEPTH_BINS)[1].tolist()]}
                                    for label, rows in by_model.items()},
               "steps_to_target": steps_to_target, "timings": timings,
               "heldout_docs": [str(Path(f).name) for f in heldout], "machine": machine}
    _plots(root, results)
    results_file.write_text(json.dumps(results, indent=1))
    return results


EVAL = {"stride": 512, "docs": 0, "batch_size": 8, "trials": 50, "passkey_min_length": 512}
DEPTH_BINS = 5  # the passkey heat maps' depth bins
EVAL_SMOKE = {"stride": 512, "docs": 1, "batch_size": 2, "trials": 2, "passkey_min_length": 256}


def _plots(root: Path, results: dict) -> None:
    from yarn_jax.eval import plots

    plots.perplexity(results["perplexity"], root / "perplexity.png", f"stride {results['stride']}")
    plots.passkey(results["passkey"], root / "passkey.png", DEPTH_BINS)


# ----------------------------------------------------------------------------------- report

def _ppl_table(results: dict) -> dict[str, dict[int, float]]:
    """{model: {length: perplexity}}, models in their order of appearance."""
    table: dict[str, dict[int, float]] = {}
    for r in results["perplexity"]:
        table.setdefault(r["model"], {})[r["length"]] = r["perplexity"]
    return table


def _passkey_table(results: dict) -> dict[str, dict[int, float]]:
    from yarn_jax.eval.passkey import accuracy

    out = {}
    for label in dict.fromkeys(r["model"] for r in results["passkey"]):
        out[label] = accuracy([r for r in results["passkey"] if r["model"] == label])[0]
    return out


def claims(results: dict) -> dict[str, tuple[bool, str]]:
    """The paper's claims, each (held at this seed, the numbers behind it)."""
    ppl = _ppl_table(results)
    ext, lengths = results["extended"], results["lengths"]
    past = lengths[-1]
    ft = {m: ppl[f"{METHODS[m]} s=8 (fine-tuned)"] for m in METHODS}
    inside = [n for n in lengths if results["original"] < n <= ext]
    out = {}
    for other in ("pi", "ntk"):
        out[f"YaRN fine-tuned has lower perplexity than {METHODS[other]} fine-tuned inside the extended window"] = (
            all(ft["yarn"][n] < ft[other][n] for n in inside),
            "; ".join(f"{n}: YaRN {ft['yarn'][n]:.3f}, {METHODS[other]} {ft[other][n]:.3f}" for n in inside))
    out[f"Past the fine-tuned length ({past} tokens) YaRN degrades less than PI"] = (
        ft["yarn"][past] < ft["pi"][past],
        f"{past}: YaRN {ft['yarn'][past]:.3f}, PI {ft['pi'][past]:.3f}, NTK {ft['ntk'][past]:.3f}")
    dyn_y, dyn_n = ppl["Dynamic YaRN (no fine-tune)"], ppl["Dynamic NTK (no fine-tune)"]
    longer = [n for n in lengths if n > results["original"]]
    out["Without fine-tuning, dynamic YaRN beats dynamic NTK past the trained length"] = (
        all(dyn_y[n] < dyn_n[n] for n in longer),
        "; ".join(f"{n}: {dyn_y[n]:.3f} vs {dyn_n[n]:.3f}" for n in longer))
    pk = _passkey_table(results)
    own = min(pk["Base (plain RoPE)"])  # the trained length (its shortest length in the smoke run)
    base_pk = pk["Base (plain RoPE)"][own]
    out[f"The base model retrieves the passkey at its trained length (at least 90% at {own})"] = (
        base_pk >= 0.9, f"{base_pk:.0%}")
    yarn_pk = pk[f"{METHODS['yarn']} s=8 (fine-tuned)"]
    out["Fine-tuned YaRN retrieves the passkey inside the extended window (at least 80% at every length)"] = (
        all(yarn_pk[n] >= 0.8 for n in yarn_pk if n <= ext),
        ", ".join(f"{n}: {a:.0%}" for n, a in yarn_pk.items()))
    for with_t, without in (("yarn", "parts"), ("pi_t", "pi")):
        out[f"The attention temperature helps: {METHODS[with_t]} has lower perplexity than {METHODS[without]} "
            "inside the extended window"] = (
            all(ft[with_t][n] < ft[without][n] for n in inside),
            "; ".join(f"{n}: {ft[with_t][n]:.3f} vs {ft[without][n]:.3f}" for n in inside))
    steps = results["steps_to_target"]
    by = {m: float("inf") if s is None else s for m, s in steps.items()}  # never reached: last
    out["YaRN reaches the target perplexity in fewer fine-tuning steps than PI (and no more than NTK)"] = (
        by["yarn"] < by["pi"] and by["yarn"] <= by["ntk"],
        ", ".join(f"{METHODS[m]} {'never' if s is None else s}" for m, s in steps.items())
        + f" (target {results['target']:.3f})")
    return out


ABLATION_PARTS = {"yarn": ("by parts", "0.1 ln s + 1"), "parts": ("by parts", "1"),
                  "pi_t": ("PI", "0.1 ln s + 1"), "pi": ("PI", "1")}


def ablation(per_seed: dict[int, dict]) -> list[str]:
    """The ablation of YaRN's parts: perplexity and passkey accuracy per length, mean over seeds."""
    first = next(iter(per_seed.values()))
    lengths = first["lengths"]
    ppl = [_ppl_table(r) for r in per_seed.values()]
    pk = [_passkey_table(r) for r in per_seed.values()]
    pk_lengths = sorted({n for v in pk[0].values() for n in v})
    lines = [f"## Ablation of YaRN's parts (fine-tuned, s = {FACTOR}, mean over seeds {list(per_seed)})", "",
             "| method | frequencies | sqrt(1/t) | " + " | ".join(f"ppl {n}" for n in lengths) + " | "
             + " | ".join(f"passkey {n}" for n in pk_lengths) + " |",
             "|---|---|---|" + "---|" * (len(lengths) + len(pk_lengths))]
    for m in ABLATION:
        label = f"{METHODS[m]} s=8 (fine-tuned)"
        p = [statistics.mean(t[label][n] for t in ppl) for n in lengths]
        a = [statistics.mean(t[label][n] for t in pk) for n in pk_lengths]
        lines.append(f"| {METHODS[m]} | {ABLATION_PARTS[m][0]} | {ABLATION_PARTS[m][1]} | "
                     + " | ".join(f"{v:.3f}" for v in p) + " | " + " | ".join(f"{v:.0%}" for v in a) + " |")
    return [*lines, ""]


def report(out: Path, seeds: list[int]) -> str:
    """DIR/summary.md and DIR/results.json from each seed's results."""
    per_seed = {s: json.loads((out / f"seed{s}" / "results.json").read_text()) for s in seeds}
    lines = ["# YaRN reproduction in miniature", ""]
    first = per_seed[seeds[0]]
    lines += [f"Pretrained at {first['original']} tokens, extended by s = {FACTOR} to {first['extended']}; "
              f"held-out documents: {len(first['heldout_docs'])} standard-library files; seeds {seeds}.", ""]
    if "machine" in first:
        lines += ["Machine: " + ", ".join(f"{k} {v}" for k, v in first["machine"].items()), ""]
    verdicts: dict[str, list[bool]] = {}
    for seed, res in per_seed.items():
        ppl = _ppl_table(res)
        lines += [f"## Seed {seed}", "", f"Sliding-window perplexity (stride {res['stride']}):", "",
                  "| model | " + " | ".join(map(str, res["lengths"])) + " |",
                  "|---|" + "---|" * len(res["lengths"])]
        lines += [f"| {m} | " + " | ".join(f"{ppl[m][n]:.3f}" for n in res["lengths"]) + " |" for m in ppl]
        pk = _passkey_table(res)
        pk_lengths = sorted({n for v in pk.values() for n in v})
        lines += ["", "Passkey accuracy:", "", "| model | " + " | ".join(map(str, pk_lengths)) + " |",
                  "|---|" + "---|" * len(pk_lengths)]
        lines += [f"| {m} | " + " | ".join(f"{v[n]:.0%}" for n in pk_lengths) + " |" for m, v in pk.items()]
        steps = sorted({k for c in res["curves"].values() for k, _ in c})
        lines += ["", f"Truncated perplexity at {res['extended']} by fine-tuning step (target {res['target']:.3f}, "
                  f"the base model's at {res['original']}):", "", "| method | " + " | ".join(map(str, steps)) + " |",
                  "|---|" + "---|" * len(steps)]
        lines += [f"| {METHODS[m]} | " + " | ".join(f"{p:.3f}" for _, p in c) + " |" for m, c in res["curves"].items()]
        lines += ["", "| stage | final loss | tokens/s | wall s |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['final_loss']:.4f} | {v['tokens_per_s'] or 0:,.0f} | {v['wall_s']:.0f} |"
                  for k, v in res["train"].items()]
        lines += ["", "Claims at this seed:", ""]
        for claim, (held, numbers) in claims(res).items():
            verdicts.setdefault(claim, []).append(held)
            lines.append(f"- {'HELD' if held else 'DID NOT HOLD'}: {claim} ({numbers})")
        lines.append("")
    lines += ablation(per_seed)
    lines += ["## Verdict over seeds", ""]
    for claim, held in verdicts.items():
        word = "held in every seed" if all(held) else "did not hold in any seed" if not any(held) \
            else "flips between seeds (noise)"
        lines.append(f"- {claim}: {word}")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "results.json").write_text(json.dumps(per_seed, indent=1))
    return text


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
    from yarn_jax import data

    train_files, heldout = corpus()
    if not heldout:
        print("error: the standard library has no held-out document of 48 kB or more", file=sys.stderr)
        return 2
    pretrain = _load_config("pretrain").data
    vocab = 512 if a.smoke else pretrain.tokenizer_vocab
    tokenizer = data.train_tokenizer(train_files, vocab, out / "tokenizer")
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
