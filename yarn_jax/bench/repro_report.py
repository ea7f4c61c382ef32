"""The miniature reproduction's verdicts and report, computed from each seed's results (`reproduce.run_seed`):
the paper's claims (held or not, with the numbers behind them), the ablation of YaRN's parts, and
DIR/summary.md + DIR/results.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from yarn_jax.repro import ABLATION, FACTOR, METHODS


def _ppl_table(results: dict) -> dict[str, dict[int, float]]:
    """{model: {length: perplexity}}, models in their order of appearance."""
    table: dict[str, dict[int, float]] = {}
    for r in results["perplexity"]:
        table.setdefault(r["model"], {})[r["length"]] = r["perplexity"]
    return table


DEPTH_BINS = 5  # the passkey heat maps' depth bins


def passkey_accuracy(rows: list[dict]) -> dict[str, dict]:
    """Passkey accuracy per model, from the trial rows: per length ("passkey_accuracy") and per length x
    depth bin ("passkey_by_depth", None where a bin holds no trial)."""
    from yarn_jax.eval.passkey import accuracy

    labels = dict.fromkeys(r["model"] for r in rows)
    tables = {label: accuracy([r for r in rows if r["model"] == label], DEPTH_BINS) for label in labels}
    return {"passkey_accuracy": {label: per_length for label, (per_length, _, _) in tables.items()},
            "passkey_by_depth": {label: {"depth_bins": DEPTH_BINS, "lengths": lengths,
                                         "accuracy": [[None if v != v else v for v in row] for row in grid.tolist()]}
                                 for label, (_, grid, lengths) in tables.items()}}


def _passkey_table(results: dict) -> dict[str, dict[int, float]]:
    return passkey_accuracy(results["passkey"])["passkey_accuracy"]


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
