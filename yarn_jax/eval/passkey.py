"""Passkey retrieval (the paper's section 4.3, after Mohtashami & Jaggi): a random 5-digit key hidden at a
uniformly random depth of filler text; the model greedily continues "The pass key is" and the first
integer it writes is compared with the key."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclasses.dataclass(frozen=True)
class Trial:
    length: int  # target prompt length in tokens
    depth: float  # where the key sits, 0 = start of the filler, 1 = end
    key: int
    prompt: np.ndarray  # token ids, BOS first


def make_prompt(encode: Callable[[str], list[int]], bos: int, length: int, depth: float, key: int) -> np.ndarray:
    """BOS + task + filler with the key line at `depth` + question, within `length` tokens."""
    fixed = len(encode(" ".join([TASK, key_line(key), QUESTION]))) + 1
    per_filler = len(encode(FILLER + " "))
    n = (length - fixed) // per_filler
    if n < 1:
        raise ValueError(f"--lengths: {length} tokens cannot hold the passkey task (needs more than {fixed})")
    at = int(round(depth * n))
    parts = [TASK, *[FILLER] * at, key_line(key), *[FILLER] * (n - at), QUESTION]
    return np.asarray([bos, *encode(" ".join(parts))], np.int32)


def trials(encode: Callable[[str], list[int]], bos: int, lengths: Sequence[int], n: int, seed: int = 0) -> list[Trial]:
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for _ in range(n):
            depth, key = float(rng.uniform()), int(rng.integers(10000, 100000))
            out.append(Trial(length, depth, key, make_prompt(encode, bos, length, depth, key)))
    return out


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def score(trial_list: list[Trial], answer: Callable[[np.ndarray], str], progress=None) -> list[dict]:
    """One row per trial: length, depth, key, the model's answer text, the parsed integer, correct."""
    rows = []
    for t in trial_list:
        text = answer(t.prompt)
        got = first_integer(text)
        rows.append({"length": t.length, "depth": t.depth, "key": t.key, "answer": text, "parsed": got,
                     "correct": got == t.key})
        if progress is not None:
            progress.update(1)
    return rows


def accuracy(rows: list[dict], depth_bins: int = 5) -> tuple[dict[int, float], np.ndarray, list[int]]:
    """(accuracy per length, accuracy [lengths, depth bins] (nan where empty), the lengths in order)."""
    lengths = sorted({r["length"] for r in rows})
    per_length = {n: float(np.mean([r["correct"] for r in rows if r["length"] == n])) for n in lengths}
    grid = np.full((len(lengths), depth_bins), np.nan)
    for i, n in enumerate(lengths):
        for b in range(depth_bins):
            hits = [r["correct"] for r in rows if r["length"] == n and min(int(r["depth"] * depth_bins),
                                                                           depth_bins - 1) == b]
            if hits:
                grid[i, b] = float(np.mean(hits))
    return per_length, grid, lengths
