"""Passkey retrieval (the paper's section 4.3, after Mohtashami & Jaggi): a random key hidden at a
uniformly random depth of filler text; the model greedily continues "The pass key is" (ANSWER_TOKENS
tokens) and the first integer it writes is compared with the key.

Two prompts (`Protocol`):
  - YARN (the default), as the authors' `eval/passkey.py` (jquesnelle/yarn) builds it: task, filler,
    key line, filler, question on five lines; the filler is cut at a character count (mid-word), its
    prefix drawn uniformly; keys 1..50000; the character count is the largest multiple of 25 whose prompt
    fits the length in tokens (BOS included).
  - SENTENCES (this project's first prompt): one line, whole filler sentences, 5-digit keys.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Sequence

import numpy as np

ANSWER_TOKENS = 10  # what the authors' harness generates
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
YARN_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
             "I will quiz you about the important information there.")
CHAR_STEP = 25  # the authors' length step, in filler characters
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


def _prompt(bos: int | None, ids: list[int]) -> np.ndarray:
    """The prompt's token ids: BOS first when the tokenizer has one (None: it has none, as Qwen's)."""
    return np.asarray(ids if bos is None else [bos, *ids], np.int32)


def make_prompt(encode: Callable[[str], list[int]], bos: int | None, length: int, depth: float,
                key: int) -> np.ndarray:
    """BOS + task + filler with the key line at `depth` + question, within `length` tokens."""
    fixed = len(encode(" ".join([TASK, key_line(key), QUESTION]))) + (bos is not None)
    per_filler = len(encode(FILLER + " "))
    n = (length - fixed) // per_filler
    if n < 1:
        raise ValueError(f"--lengths: {length} tokens cannot hold the passkey task (needs more than {fixed})")
    at = int(round(depth * n))
    parts = [TASK, *[FILLER] * at, key_line(key), *[FILLER] * (n - at), QUESTION]
    return _prompt(bos, encode(" ".join(parts)))


class Protocol(enum.Enum):
    YARN = "yarn"
    SENTENCES = "sentences"


def yarn_text(chars: int, prefix: int, key: int) -> str:
    """The authors' prompt: `chars` characters of filler, `prefix` of them before the key line."""
    filler = " ".join([FILLER] * (chars // (len(FILLER) + 1) + 2))  # the authors join 2000: the same text
    return "\n".join([YARN_TASK, filler[:prefix], key_line(key), filler[:chars - prefix], QUESTION])


def _yarn_chars(encode: Callable[[str], list[int]], bos: int | None, length: int) -> int:
    """The largest multiple of CHAR_STEP characters of filler whose prompt (BOS + text, the key line at the
    middle) has at most `length` tokens."""
    fits = lambda c: len(_prompt(bos, encode(yarn_text(c, c // 2, 50000)))) <= length  # noqa: E731
    if not fits(0):
        raise ValueError(f"--lengths: {length} tokens cannot hold the passkey task")
    lo, hi = 0, CHAR_STEP
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > CHAR_STEP:  # fits(lo), not fits(hi)
        mid = (lo + hi) // (2 * CHAR_STEP) * CHAR_STEP
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def yarn_prompt(encode: Callable[[str], list[int]], bos: int | None, length: int, chars: int, depth: float,
                key: int) -> np.ndarray:
    """BOS + the authors' prompt with `chars` of filler (fewer, by CHAR_STEP, while it is over `length`)."""
    while True:
        ids = _prompt(bos, encode(yarn_text(chars, int(depth * chars), key)))
        if len(ids) <= length or chars == 0:
            return ids
        chars -= CHAR_STEP


def trials(encode: Callable[[str], list[int]], bos: int | None, lengths: Sequence[int], n: int, seed: int = 0,
           protocol: Protocol = Protocol.YARN) -> list[Trial]:
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        chars = _yarn_chars(encode, bos, length) if protocol is Protocol.YARN else 0
        for _ in range(n):
            depth = float(rng.uniform())
            if protocol is Protocol.YARN:
                key = int(rng.integers(1, 50001))
                prompt = yarn_prompt(encode, bos, length, chars, depth, key)
            else:
                key = int(rng.integers(10000, 100000))
                prompt = make_prompt(encode, bos, length, depth, key)
            out.append(Trial(length, depth, key, prompt))
    return out


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def score(trial_list: list[Trial], answer: Callable[[list[np.ndarray]], list[str]], batch: int = 1,
          progress=None) -> list[dict]:
    """One row per trial: length, depth, key, the model's answer text, the parsed integer, correct.
    `answer` takes `batch` prompts at once (the last group padded with copies of its last prompt, whose
    answers are dropped) and returns one text per prompt."""
    rows = []
    for at in range(0, len(trial_list), batch):
        group = trial_list[at:at + batch]
        texts = answer([t.prompt for t in group] + [group[-1].prompt] * (batch - len(group)))
        for t, text in zip(group, texts, strict=False):
            got = first_integer(text)
            rows.append({"length": t.length, "depth": t.depth, "key": t.key, "answer": text, "parsed": got,
                         "correct": got == t.key})
        if progress is not None:
            progress.update(len(group))
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
