"""The YaRN authors' evaluation loops (jquesnelle/yarn, eval/perplexity.py and eval/passkey.py), re-written
by us from their description, deliberately plainly, as the oracle for `yarn_jax.eval`'s YARN protocols."""

import math

import torch


def sliding_window_perplexity(model, docs: list[list[int]], bos: int, max_length: int, sliding_window: int) -> float:
    """docs: text token ids (no BOS). Every window is BOS + up to max_length - 1 text tokens; the labels of
    tokens an earlier window scored are -100; the result is exp of the mean of the windows' mean losses."""
    nlls = []
    for ids in docs:
        seq_len, prev_end = len(ids), 0
        for begin in range(0, seq_len, sliding_window):
            end = min(begin + max_length - 1, seq_len)
            trg_len = end - prev_end
            input_ids = torch.tensor([[bos, *ids[begin:end]]])
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                nlls.append(float(model(input_ids, labels=target_ids).loss))
            prev_end = end
            if end == seq_len:
                break
    return math.exp(sum(nlls) / len(nlls))


def passkey_prompt(n_garbage: int, n_garbage_prefix: int, pass_key: int) -> str:
    task_description = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                        "them. I will quiz you about the important information there.")
    garbage = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    garbage_inf = " ".join([garbage] * 2000)
    lines = [task_description, garbage_inf[:n_garbage_prefix],
             f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key.",
             garbage_inf[:n_garbage - n_garbage_prefix], "What is the pass key? The pass key is"]
    return "\n".join(lines)
