"""PNG plots of the evaluation tables (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def perplexity(rows: list[dict], path: Path, protocol: str) -> None:
    """Perplexity against context length (log2 axis), one line per model/method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["length"], r["perplexity"]) for r in rows if r["model"] == label)
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Sliding-window perplexity ({protocol})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def passkey(rows: list[dict], path: Path, depth_bins: int) -> None:
    """Accuracy heat map per model: context length x depth of the key."""
    from yarn_jax.eval.passkey import accuracy

    plt = _plt()
    labels = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(4, len(labels))
    nrows = -(-len(labels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for ax, label in zip(axes.flat[:len(labels)], labels, strict=True):
        _, grid, lengths = accuracy([r for r in rows if r["model"] == label], depth_bins)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xticks(range(depth_bins), [f"{(b + 0.5) / depth_bins:.1f}" for b in range(depth_bins)])
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("context length")
        ax.set_title(label, fontsize=9)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
