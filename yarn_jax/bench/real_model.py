"""YaRN on a real pretrained model: SmolLM2-135M-Instruct (LLaMA architecture, trained at 8192 tokens,
4-bit weights dequantized) and Jane Austen's six novels (105k-222k tokens each), with the project's own
convert, train and eval, and transformers on the same weights for parity.

    python -m yarn_jax.bench real-model --out DIR [--cache DIR] [--stages ...] [--steps N] [--trials N]

Stages (`--stages`, all by default; each resumes: finished evaluations are kept, training restarts from
its newest checkpoint, so a run cut short is run again as it was):
  convert   the fixture (`bench/smollm2.py`) -> DIR/base (`python -m yarn_jax.convert from-hf`)
  base      without fine-tuning: sliding-window perplexity (the paper's protocol, stride = length / 2) at
            1/4x .. 8x the trained length for plain RoPE, PI s=4, NTK-aware s=4, dynamic NTK, YaRN s=4 and
            s=8, dynamic YaRN; passkey (the authors' prompt) at 1/2x .. 4x
  finetune  YaRN s=4, PI s=4 and NTK-aware s=4 (8k -> 32k, configs/real_model.py, one budget), and YaRN s=4
            trained on 16k-token sequences only ("train short, test long")
  tuned     the fine-tuned models: perplexity and passkey at 1x .. 8x; truncated perplexity at 4x of every
            checkpoint (the steps to reach the base model's own at 1x)
  parity    truncated float32 perplexity at 1x and 4x, plain RoPE and YaRN s=4: ours against transformers
            on the same weights and token ids
then DIR/results.json, DIR/summary.md (tables and the paper's claims, each held or not, from the numbers)
and DIR/*.png. `--hf`, `--novels` and `--finetune` replace the fixture's parts (another model, a tiny one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from yarn_jax import cli
from yarn_jax.bench.real_model_report import FACTOR, FT_METHODS, SHORT, summary, tuned_label
from yarn_jax.bench.reproduce import _eval, _machine, _spec, _train, steps_to_target
from yarn_jax.repro import finetune_rope

STAGES = ("convert", "base", "finetune", "tuned", "parity")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The lengths of every stage, from the model's trained length `original`."""

    original: int
    steps: int = 120
    save_every: int = 20
    trials: int = 20
    docs: int = 0  # novels evaluated (0: all)
    tokens_per_forward: int = 65536  # perplexity windows batched up to this many tokens
    parity_lengths: tuple[int, ...] = ()  # default: the trained and the extended length

    @property
    def extended(self) -> int:
        return self.original * FACTOR

    def times(self, *factors: float) -> list[int]:
        return [int(self.original * f) for f in factors]

    @property
    def base_lengths(self) -> list[int]:
        return self.times(1 / 4, 1 / 2, 1, 2, 4, 8)

    @property
    def tuned_lengths(self) -> list[int]:
        return self.times(1, 2, 4, 8)

    @property
    def base_passkey(self) -> list[int]:
        return self.times(1 / 2, 1, 2, 4)

    def no_finetune(self) -> dict[str, str]:
        """{label: eval --rope spec} of the scalings evaluated without fine-tuning."""
        o = self.original
        return {"RoPE": "none", f"PI s={FACTOR}": _spec(finetune_rope("pi", o, FACTOR)),
                f"NTK-aware s={FACTOR}": _spec(finetune_rope("ntk", o, FACTOR)), "Dynamic NTK": "dynamic:factor=1",
                f"YaRN s={FACTOR}": _spec(finetune_rope("yarn", o, FACTOR)),
                "YaRN s=8": _spec(finetune_rope("yarn", o, 8)),
                "Dynamic YaRN": f"dynamic_yarn:original_max_position_embeddings={o}"}


# ----------------------------------------------------------------------------------- stages

def finetune_configs(plan: Plan, base: Path, finetune: Path) -> dict[str, Any]:
    """{method: run config}: configs/real_model.py with the plan's trained length, steps and budget."""
    from yarn_jax import run_config

    path = Path(__file__).resolve().parents[2] / "configs" / "real_model.py"
    out = {}
    for method in [*FT_METHODS, SHORT]:
        c = run_config.load(f"{path}:{'yarn' if method == SHORT else method}", [])
        with c.unlocked():
            c.init_from = str(base)
            c.rope = finetune_rope("yarn" if method == SHORT else method, plan.original, FACTOR)
            c.data.update(dict(sources=(str(finetune),), seq_len=plan.extended // (2 if method == SHORT else 1)))
            c.train.update(dict(steps=plan.steps, save_every=plan.save_every, loss_chunk=min(c.train.loss_chunk,
                                                                                             plan.original)))
            c.optim.warmup_steps = min(c.optim.warmup_steps, plan.steps // 2)
            if method == SHORT:  # the same tokens per step as the others: twice the sequences of half the length
                c.data.batch_size *= 2
        out[method] = c
    return out


def _ppl_args(plan: Plan, novels: Path, lengths: list[int], dtype: str) -> list[list[str]]:
    """eval perplexity arguments, one list per length: the stride half of the length, windows batched to
    `plan.tokens_per_forward` tokens."""
    data = ["--data", str(novels), "--format", "jsonl", "--docs", str(plan.docs), "--dtype", dtype]
    return [[*data, "--lengths", str(n), "--sliding-window", str(n // 2), "--batch-size",
             str(max(1, plan.tokens_per_forward // n))] for n in lengths]


def evaluate(out: Path, name: str, models: list[str], plan: Plan, novels: Path, ppl_lengths: list[int],
             pk_lengths: list[int], dtype: str) -> tuple[list[dict], list[dict]]:
    """(perplexity rows, passkey rows) of `models` (eval arguments) under OUT/NAME_*."""
    ppl = [r for args in _ppl_args(plan, novels, ppl_lengths, dtype)
           for r in _eval("perplexity", out / f"{name}_ppl_{args[args.index('--lengths') + 1]}", [*models, *args])]
    pk = _eval("passkey", out / f"{name}_passkey", [*models, "--lengths", ",".join(map(str, pk_lengths)),
                                                     "--trials", str(plan.trials), "--dtype", dtype])
    return ppl, pk


def steps_curves(out: Path, plan: Plan, cfgs: dict[str, Any], base: Path, novels: Path, dtype: str
                 ) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """(target, {method: [(step, truncated perplexity at the extended length)]}) of the fine-tuned methods
    (`reproduce.steps_to_target` on the novels): the target is the base model's at its trained length."""
    trunc = ["--data", str(novels), "--format", "jsonl", "--docs", str(plan.docs), "--truncate", "--dtype", dtype]
    static = {m: _spec(finetune_rope(m, plan.original, FACTOR)) for m in FT_METHODS}
    return steps_to_target(out, base, {m: cfgs[m] for m in FT_METHODS}, static, trunc, plan.original, plan.extended)


def parity(out: Path, hf: Path, novels: Path, plan: Plan, separate_process: bool = True) -> list[dict]:
    """Truncated float32 perplexity of the first two novels (one with `plan.docs` 1) at `plan.parity_lengths`
    (default 1x and 4x), plain RoPE and YaRN s=4: ours (the eval code) and transformers' (in a separate
    process by default, so that the two frameworks do not share the device)."""
    result = out / "parity.json"
    if result.exists():
        return json.loads(result.read_text())
    import numpy as np

    from yarn_jax import convert
    from yarn_jax.eval import perplexity
    from yarn_jax.eval.__main__ import _rope
    from yarn_jax.io import tokenizer as tokenizer_lib
    from yarn_jax.model.config import LlamaConfig, with_rope

    cfg0, params = convert.load_hf(hf, dtype="float32")
    tok = tokenizer_lib.load(hf)
    texts = [json.loads(line)["text"] for line in open(novels)][:min(plan.docs or 2, 2)]
    lengths = list(plan.parity_lengths or (plan.original, plan.extended))
    docs = [np.asarray(tok.with_bos(tok.encode(t))[:max(lengths)], np.int32) for t in texts]
    work = out / "parity"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "tokens.npy", np.stack(docs))
    rows = []
    yarn = _spec(finetune_rope("yarn", plan.original, FACTOR))
    for label, spec in (("RoPE", "none"), (f"YaRN s={FACTOR}", yarn)):
        cfg = LlamaConfig.from_hf(with_rope(cfg0.to_hf(), _rope(spec))).replace(execution=cfg0.execution)
        hf_config = work / f"config_{len(rows)}.json"
        hf_config.write_text(json.dumps(convert.transformers_config(cfg)))
        args = [str(hf), str(hf_config), str(work / "tokens.npy"), ",".join(map(str, lengths))]
        theirs = _transformers_side(out, args) if separate_process else transformers_perplexity(*args)
        for n in lengths:
            ours = perplexity.evaluate(cfg, params, docs, n, stride=None, bos=tok.bos_id is not None)["perplexity"]
            rows.append({"model": label, "length": n, "yarn_jax": ours, "transformers": theirs[n],
                         "relative": abs(ours - theirs[n]) / theirs[n]})
            print(f"parity {label} @ {n}: yarn_jax {ours:.6f}, transformers {theirs[n]:.6f}", flush=True)
    result.write_text(json.dumps(rows, indent=1))
    return rows


def _transformers_side(out: Path, args: list[str]) -> dict[int, float]:
    worker = subprocess.run([sys.executable, "-m", "yarn_jax.bench", "real-model", "--out", str(out),
                             "--transformers-worker", *args], capture_output=True, text=True)
    if worker.returncode:
        raise ValueError(f"parity: transformers' side failed: {cli.one_line(worker.stderr)[-300:]}")
    return {int(n): p for n, p in json.loads(worker.stdout.strip().splitlines()[-1]).items()}


def transformers_perplexity(hf: str, config: str, tokens: str, lengths: str) -> dict[int, float]:
    """{length: perplexity} of transformers' model (float32, `config` over `hf`'s weights) on `tokens`
    [docs, T] cut to each length: exp of the mean over documents of each one's mean NLL."""
    import numpy as np
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = transformers.AutoConfig.for_model(**json.loads(Path(config).read_text()))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, config=cfg, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(device).eval()
    ids = np.load(tokens)
    out = {}
    with torch.no_grad():
        for n in map(int, lengths.split(",")):
            rows = torch.as_tensor(ids[:, :n].astype(np.int64), device=device)
            nll = [float(model(x[None], labels=x[None]).loss) for x in rows]
            out[n] = math.exp(sum(nll) / len(nll))
    return out


# ----------------------------------------------------------------------------------- entry point

def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m yarn_jax.bench real-model", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for every stage's results (a rerun resumes)")
    p.add_argument("--cache", help="where the fixture is built (default: ~/.cache/yarn_jax/real_model)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    p.add_argument("--hf", help="a Hugging Face model directory instead of the fixture's SmolLM2")
    p.add_argument("--novels", help="a JSONL file of evaluation documents instead of the fixture's novels")
    p.add_argument("--finetune", help="a JSONL file of fine-tuning documents instead of the fixture's")
    p.add_argument("--steps", type=cli.count(1), default=Plan.steps, help="fine-tuning steps of each method")
    p.add_argument("--save-every", type=cli.count(1), default=Plan.save_every, help="checkpoint interval")
    p.add_argument("--trials", type=cli.count(1), default=Plan.trials, help="passkey prompts per length")
    p.add_argument("--docs", type=cli.count(0), default=Plan.docs, help="novels evaluated (0: all)")
    p.add_argument("--tokens-per-forward", type=cli.count(1), default=Plan.tokens_per_forward,
                   help="perplexity windows batched up to this many tokens")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of the evaluations (parity: float32)")
    p.add_argument("--parity-lengths", type=cli.int_list, default=[],
                   help="lengths of the parity check (default: the trained and the extended length)")
    p.add_argument("--transformers-worker", nargs=4, help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    if a.transformers_worker:
        print(json.dumps(transformers_perplexity(*a.transformers_worker)))
        return 0
    stages = [s for s in a.stages.split(",") if s]
    if not stages or set(stages) - set(STAGES):
        raise ValueError(f"--stages: expected some of {','.join(STAGES)}, got {a.stages!r}")
    from yarn_jax.bench import smollm2

    out = cli.check_writable(a.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    parts = tuple(p for p, given in (("hf", a.hf), ("novels", a.novels), ("finetune", a.finetune)) if not given
                  and (p != "finetune" or "finetune" in stages))
    fx = smollm2.build(a.cache, parts)
    hf, novels, finetune = Path(a.hf or fx.hf), Path(a.novels or fx.novels), Path(a.finetune or fx.finetune)
    for flag, path in (("--hf", hf / "config.json"), ("--novels", novels), ("--finetune", finetune)):
        if not path.is_file() and (flag != "--finetune" or "finetune" in stages):
            raise ValueError(f"{flag}: {path} does not exist")
    original = json.loads((hf / "config.json").read_text())["max_position_embeddings"]
    plan = Plan(original, a.steps, a.save_every, a.trials, a.docs, a.tokens_per_forward, tuple(a.parity_lengths))
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    res = {**previous, "original": plan.original, "extended": plan.extended, "base_lengths": plan.base_lengths,
           "tuned_lengths": plan.tuned_lengths, "trials": plan.trials, "machine": _machine(),
           "timings": json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}}
    from yarn_jax.io import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load(hf)
    texts = [json.loads(line)["text"] for line in open(novels)]
    texts = texts[:plan.docs] if plan.docs else texts
    res.update(docs=len(texts), tokens=sum(len(tok.encode(t)) for t in texts))
    run_stages(stages, out, plan, hf, novels, finetune, a.dtype, res)
    _finish(out, res)
    print((out / "summary.md").read_text())
    return 0


def run_stages(stages: list[str], out: Path, plan: Plan, hf: Path, novels: Path, finetune: Path, dtype: str,
               res: dict) -> None:
    """Runs `stages` in order into OUT, adding their results (and wall times) to `res`."""
    def timed(name, fn, *args):  # each stage's wall time, kept at once (a later stage may be cut short)
        t0 = time.perf_counter()
        value = fn(*args)
        res["timings"][name] = res["timings"].get(name, 0.0) + time.perf_counter() - t0
        (out / "timings.json").write_text(json.dumps(res["timings"]))
        return value

    base = out / "base"
    if "convert" in stages and not base.exists():
        from yarn_jax.convert import main as convert_main

        timed("convert", convert_main, ["from-hf", str(hf), str(base)])
    if "base" in stages:
        specs = plan.no_finetune()
        models = ["--checkpoint", f"base={base}", *[x for s in specs.values() for x in ("--rope", s)]]
        ppl, pk = timed("base", evaluate, out, "base", models, plan, novels, plan.base_lengths, plan.base_passkey,
                        dtype)
        names = {("base" if s == "none" else f"base {s}"): label for label, s in specs.items()}
        res["base"] = {"perplexity": [{**r, "model": names[r["model"]]} for r in ppl],
                       "passkey": [{**r, "model": names[r["model"]]} for r in pk]}
    cfgs = finetune_configs(plan, base, finetune)
    if "finetune" in stages:
        res["train"] = {m: timed(f"finetune_{m}", _train, c, out / f"finetune_{m}") for m, c in cfgs.items()}
    if "tuned" in stages:
        models = [x for m in cfgs for x in ("--checkpoint", f"{m}={out / f'finetune_{m}' / 'checkpoints'}")]
        ppl, pk = timed("tuned", evaluate, out, "tuned", models, plan, novels, plan.tuned_lengths,
                        plan.tuned_lengths, dtype)
        res["tuned"] = {"perplexity": [{**r, "model": tuned_label(r["model"])} for r in ppl],
                        "passkey": [{**r, "model": tuned_label(r["model"])} for r in pk]}
        res["target"], res["curves"] = timed("steps", steps_curves, out, plan, cfgs, base, novels, dtype)
        res["steps_to_target"] = {m: next((k for k, p in c if p <= res["target"]), None)
                                  for m, c in res["curves"].items()}
    if "parity" in stages:
        res["parity"] = timed("parity", parity, out, hf, novels, plan)


def _finish(out: Path, res: dict) -> None:
    from yarn_jax.bench.repro_report import passkey_accuracy
    from yarn_jax.eval import plots

    res["perplexity"] = [r for k in ("base", "tuned") for r in res.get(k, {}).get("perplexity", [])]
    res["passkey"] = [r for k in ("base", "tuned") for r in res.get(k, {}).get("passkey", [])]
    res.update(passkey_accuracy(res["passkey"]))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "summary.md").write_text(summary(res))
    if res["perplexity"]:
        plots.perplexity(res["perplexity"], out / "perplexity.png", "stride = length / 2")
    if res["passkey"]:
        plots.passkey(res["passkey"], out / "passkey.png", 5)
