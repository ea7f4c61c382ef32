"""The real-model benchmark's verdicts and report, computed from its results (`real_model.main`): the
paper's claims on SmolLM2-135M, each held or not with the numbers behind it, and DIR/summary.md."""

from __future__ import annotations

FACTOR = 4
FT_METHODS = {"yarn": "YaRN", "pi": "PI", "ntk": "NTK-aware"}
SHORT = "yarn_short"  # YaRN s=4 fine-tuned on sequences of 2x the trained length only


def tuned_label(method: str) -> str:
    return "YaRN s=4, fine-tuned at 2x" if method == SHORT else f"{FT_METHODS[method]} s={FACTOR}, fine-tuned"


def tables(rows: list[dict], key: str = "perplexity") -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["model"], {})[r["length"]] = r[key]
    return out


def claims(res: dict) -> dict[str, tuple[bool, str]]:
    """The paper's claims on this model, each (held, the numbers behind it)."""
    ppl, pk = tables(res["perplexity"]), res["passkey_accuracy"]
    o, ext = res["original"], res["extended"]
    s4, pi4, ntk4 = f"YaRN s={FACTOR}", f"PI s={FACTOR}", f"NTK-aware s={FACTOR}"
    longer = [n for n in res["base_lengths"] if n > o]
    inside = [n for n in longer if n <= ext]
    shorter = [n for n in res["base_lengths"] if n <= o]
    fmt = lambda d, ns: ", ".join(f"{n}: {d[n]:.2f}" for n in ns)  # noqa: E731
    out = {}
    if "RoPE" in ppl:
        out["Plain RoPE fails past its trained length (perplexity at 2x more than twice its own at 1x)"] = (
            ppl["RoPE"][2 * o] > 2 * ppl["RoPE"][o], fmt(ppl["RoPE"], [o, 2 * o]))
        out[f"Without fine-tuning, YaRN s={FACTOR} extends the window: perplexity inside {ext} stays within 10% "
            "of plain RoPE's at the trained length"] = (
            all(ppl[s4][n] <= 1.1 * ppl["RoPE"][o] for n in inside),
            f"RoPE at {o}: {ppl['RoPE'][o]:.2f}; YaRN {fmt(ppl[s4], inside)}")
        out[f"Without fine-tuning, YaRN s={FACTOR} costs little inside the trained length "
            "(within 5% of plain RoPE)"] = (
            all(ppl[s4][n] <= 1.05 * ppl["RoPE"][n] for n in shorter),
            "; ".join(f"{n}: {ppl[s4][n]:.2f} vs {ppl['RoPE'][n]:.2f}" for n in shorter))
        for other in (pi4, ntk4):
            out[f"Without fine-tuning, YaRN s={FACTOR} has lower perplexity than {other} past the trained length"] = (
                all(ppl[s4][n] < ppl[other][n] for n in inside),
                "; ".join(f"{n}: {ppl[s4][n]:.2f} vs {ppl[other][n]:.2f}" for n in inside))
        out["Dynamic YaRN beats dynamic NTK past the trained length, without fine-tuning"] = (
            all(ppl["Dynamic YaRN"][n] < ppl["Dynamic NTK"][n] for n in longer),
            "; ".join(f"{n}: {ppl['Dynamic YaRN'][n]:.2f} vs {ppl['Dynamic NTK'][n]:.2f}" for n in longer))
        out[f"The base model retrieves the passkey at its trained length (at least 90% at {o})"] = (
            pk["RoPE"][o] >= 0.9, f"{pk['RoPE'][o]:.0%}")
    ft = {m: ppl.get(tuned_label(m)) for m in [*FT_METHODS, SHORT]}
    if all(ft.values()):
        tuned_inside = [n for n in res["tuned_lengths"] if o < n <= ext]
        for other in ("pi", "ntk"):
            out[f"Fine-tuned, YaRN has lower perplexity than {FT_METHODS[other]} inside the extended window"] = (
                all(ft["yarn"][n] < ft[other][n] for n in tuned_inside),
                "; ".join(f"{n}: {ft['yarn'][n]:.2f} vs {ft[other][n]:.2f}" for n in tuned_inside))
        past = max(res["tuned_lengths"])
        out[f"Past the fine-tuned length ({past}) YaRN degrades less than PI and NTK-aware"] = (
            ft["yarn"][past] < min(ft["pi"][past], ft["ntk"][past]),
            f"{past}: YaRN {ft['yarn'][past]:.2f}, PI {ft['pi'][past]:.2f}, NTK-aware {ft['ntk'][past]:.2f}")
        out[f"Train short, test long: YaRN fine-tuned on {ext // 2}-token sequences is within 5% of YaRN "
            f"fine-tuned on {ext} at {ext} and beyond"] = (
            all(ft[SHORT][n] <= 1.05 * ft["yarn"][n] for n in res["tuned_lengths"] if n >= ext),
            "; ".join(f"{n}: {ft[SHORT][n]:.2f} vs {ft['yarn'][n]:.2f}" for n in res["tuned_lengths"] if n >= ext))
        yarn_pk = pk[tuned_label("yarn")]
        out["Fine-tuned YaRN retrieves the passkey inside the extended window (at least 80% at every length)"] = (
            all(a >= 0.8 for n, a in yarn_pk.items() if n <= ext),
            ", ".join(f"{n}: {a:.0%}" for n, a in sorted(yarn_pk.items())))
        by = {m: float("inf") if s is None else s for m, s in res["steps_to_target"].items()}
        out["YaRN reaches the target perplexity in fewer fine-tuning steps than PI (and no more than NTK-aware)"] = (
            by["yarn"] < by["pi"] and by["yarn"] <= by["ntk"],
            ", ".join(f"{FT_METHODS[m]} {'never' if s is None else s}" for m, s in res["steps_to_target"].items())
            + f" (target {res['target']:.3f})")
    if res.get("parity"):
        worst = max(r["relative"] for r in res["parity"])
        out["Our perplexities equal transformers' on the same weights and tokens (float32, 1e-4 relative)"] = (
            worst <= 1e-4, f"largest relative difference {worst:.1e}")
    return out


def summary(res: dict) -> str:
    ppl, pk = tables(res["perplexity"]), res["passkey_accuracy"]
    lengths = sorted({n for v in ppl.values() for n in v})
    pk_lengths = sorted({n for v in pk.values() for n in v})
    lines = ["# YaRN on SmolLM2-135M-Instruct and Jane Austen's novels", "",
             f"Trained at {res['original']} tokens; s = {FACTOR} extends it to {res['extended']}. "
             f"Sliding-window perplexity (the paper's protocol, stride = length / 2) over {res['docs']} novels "
             f"({res['tokens']:,} tokens); passkey: the authors' prompt, {res['trials']} trials per length.", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in res["machine"].items()), "",
             "| model | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---|" * len(lengths)]
    lines += [f"| {m} | " + " | ".join(f"{v[n]:.2f}" if n in v else "" for n in lengths) + " |" for m, v in ppl.items()]
    lines += ["", "Passkey accuracy:", "", "| model | " + " | ".join(map(str, pk_lengths)) + " |",
              "|---|" + "---|" * len(pk_lengths)]
    lines += [f"| {m} | " + " | ".join(f"{v[n]:.0%}" if n in v else "" for n in pk_lengths) + " |"
              for m, v in pk.items()]
    if res.get("curves"):
        steps = sorted({k for c in res["curves"].values() for k, _ in c})
        lines += ["", f"Truncated perplexity at {res['extended']} by fine-tuning step (target {res['target']:.3f}: "
                  f"the base model's at {res['original']}):", "", "| method | " + " | ".join(map(str, steps)) + " |",
                  "|---|" + "---|" * len(steps)]
        lines += [f"| {FT_METHODS[m]} | " + " | ".join(f"{p:.3f}" for _, p in c) + " |"
                  for m, c in res["curves"].items()]
        lines += ["", "| fine-tune | final loss | tokens/s |", "|---|---|---|"]
        lines += [f"| {tuned_label(k)} | {v['final_loss']:.4f} | {v['tokens_per_s'] or 0:,.0f} |"
                  for k, v in res["train"].items()]
    if res.get("parity"):
        lines += ["", "Parity with transformers (float32, truncated perplexity of the first novels):", "",
                  "| model | length | yarn_jax | transformers | relative |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['length']} | {r['yarn_jax']:.6f} | {r['transformers']:.6f} | "
                  f"{r['relative']:.1e} |" for r in res["parity"]]
    lines += ["", "## The paper's claims on this model", ""]
    lines += [f"- **{'held' if held else 'did not hold'}**: {claim} ({numbers})"
              for claim, (held, numbers) in claims(res).items()]
    if res.get("timings"):
        lines += ["", "Stage wall times (s, summed over resumed runs; a stage cut short counts from its "
                  "resumption): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items())]
    return "\n".join(lines) + "\n"
