"""The reproduction harness: the corpus split, the synthetic passkey documents, the fine-tuning scalings,
and the claim verdicts and report computed from results (the full run needs a GPU; see the README)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.train_helpers import corpus as small_corpus
from yarn_jax import config as config_lib
from yarn_jax import data, repro
from yarn_jax import rope as rope_lib
from yarn_jax.bench import reproduce
from yarn_jax.eval import passkey


def test_corpus_split_is_disjoint_and_held_out_documents_are_long():
    train, held = repro.corpus()
    assert held and len(train) > 10 * len(held)
    assert not set(train) & set(held)
    assert all(Path(f).stat().st_size >= repro.HELD_OUT_MIN_BYTES for f in held)
    assert train == sorted(train) and repro.corpus() == (train, held)  # stable


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return data.train_tokenizer(small_corpus(), 512, tmp_path_factory.mktemp("spm"))


def test_passkey_documents_fit_the_trained_length_and_answer_their_key(tokenizer, tmp_path):
    paths = repro.passkey_documents(tmp_path, tokenizer, 512, n=40)
    sp = data.load_tokenizer(tokenizer)
    lengths = []
    for path in paths:
        text = Path(path).read_text()
        key = passkey.first_integer(text.split("The pass key is ")[1])
        assert text.endswith(f"{passkey.QUESTION} {key}.")
        assert text.count(passkey.key_line(key)) == 1
        lengths.append(len(sp.encode(text)) + 2)  # + BOS and EOS, as the pipeline adds them
    assert max(lengths) <= 512 and min(lengths) < max(lengths) - 150  # all fit; filler lengths vary
    again = repro.passkey_documents(tmp_path / "again", tokenizer, 512, n=40)
    assert [Path(p).read_text() for p in again] == [Path(p).read_text() for p in paths]  # fixed keys
    with pytest.raises(ValueError, match="data.seq_len"):
        repro.passkey_documents(tmp_path / "short", tokenizer, 40, n=1)


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn"])
def test_finetune_scalings_extend_a_512_model_by_8(method):
    rope = repro.finetune_rope(method, 512, 8)
    hf = config_lib.tiny(max_position_embeddings=512, head_dim=64).to_hf()
    hf["max_position_embeddings"] = rope.pop("max_position_embeddings")
    hf["rope_scaling"] = rope
    cfg = config_lib.LlamaConfig.from_hf(hf)
    assert cfg.max_position_embeddings == 4096
    plain, _ = rope_lib.frequencies(config_lib.tiny(head_dim=64).rope, 4096, dtype=np.float64)
    scaled, _ = rope_lib.frequencies(cfg.rope, 4096, dtype=np.float64)
    assert np.all(scaled <= plain) and scaled[-1] < plain[-1] / 2  # the lowest frequency is interpolated
    with pytest.raises(ValueError, match="method"):
        repro.finetune_rope("longrope", 512, 8)


def _results(seed: int, yarn_wins: bool) -> dict:
    """A results dict shaped like run_seed's, with YaRN ahead of (or behind) everything."""
    lengths = [512, 1024, 2048, 4096, 8192]
    good, bad = (40.0, 50.0) if yarn_wins else (50.0, 40.0)
    ppl = {"Base (plain RoPE)": 60.0, "YaRN s=8 (no fine-tune)": 55.0, "Dynamic NTK (no fine-tune)": bad + 10,
           "Dynamic YaRN (no fine-tune)": good + 10, "PI s=8 (fine-tuned)": bad, "NTK-aware s=8 (fine-tuned)": bad,
           "YaRN s=8 (fine-tuned)": good}
    rows = [{"model": m, "length": n, "perplexity": p + n / 1e4} for m, p in ppl.items() for n in lengths]
    keys = [{"model": m, "length": n, "depth": 0.5, "key": 12345, "parsed": 12345 if yarn_wins else 1,
             "correct": yarn_wins} for m in ppl for n in lengths]
    curves = {m: [[0, 100.0], [25, good if m == "yarn" else bad]] for m in reproduce.METHODS}
    return {"seed": seed, "stride": 512, "lengths": lengths, "original": 512, "extended": 4096,
            "train": {"pretrain": {"final_loss": 3.0, "tokens_per_s": 1e5, "wall_s": 10.0}},
            "perplexity": rows, "passkey": keys, "target": 45.0, "curves": curves,
            "steps_to_target": {m: 25 if m == "yarn" or not yarn_wins else None for m in reproduce.METHODS},
            "timings": {}, "heldout_docs": ["a.py"]}


def test_claims_follow_the_numbers():
    held = reproduce.claims(_results(0, yarn_wins=True))
    assert all(ok for ok, _ in held.values()) and len(held) == 6
    failed = reproduce.claims(_results(0, yarn_wins=False))
    assert not any(ok for ok, _ in failed.values())


def test_report_calls_a_claim_that_flips_between_seeds_noise(tmp_path):
    for seed, wins in ((0, True), (1, False)):
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(_results(seed, wins)))
    text = reproduce.report(tmp_path, [0, 1])
    assert text.count("flips between seeds (noise)") == 6
    assert "| YaRN s=8 (fine-tuned) | 40.051 | 40.102 | 40.205 | 40.410 | 40.819 |" in text
    assert (tmp_path / "summary.md").read_text() == text
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"0", "1"}
