"""Evaluation: perplexity equals an independent transformers computation; the passkey harness scores
right; bad input is a clear error; the CLI writes CSV, JSON and PNG."""

import json
import re

import numpy as np
import pytest
import torch

from tests import hf_models
from tests.train_helpers import corpus
from yarn_jax import convert
from yarn_jax.eval import __main__ as cli
from yarn_jax.eval import passkey, perplexity
from yarn_jax.io import tokenizer as tokenizer_lib

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model = hf_models.hf_model(hf_models.hf_config(rope_scaling=YARN, max_pos=128, vocab=512))
    model.save_pretrained(d)
    return d, model


def _hf_nll(model, doc, length, stride):
    """transformers' sliding-window recipe, written out: labels of already-scored tokens set to -100."""
    total, count, prev_end = 0.0, 0, 0
    ranges = range(0, len(doc), stride) if stride else [0]
    for begin in ranges:
        end = min(begin + length, len(doc))
        trg_len = end - prev_end if stride else end
        ids = torch.as_tensor(doc[begin:end])[None]
        labels = ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        y = labels[0, 1:]
        keep = y != -100
        total -= float(logp[keep].gather(1, y[keep][:, None]).sum())
        count += int(keep.sum())
        prev_end = end
        if end == len(doc):
            break
    return total, count


@pytest.mark.parametrize("stride", [16, None], ids=["sliding", "truncate"])
def test_perplexity_equals_transformers(model_dir, stride):
    d, model = model_dir
    cfg, params = convert.load_hf(d, dtype="float32")
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[1], rng.integers(3, 512, n - 1)]).astype(np.int32) for n in (150, 97, 64, 40)]
    length = 64
    got = perplexity.evaluate(cfg, params, docs, length, stride=stride, batch_size=3, protocol=perplexity.Protocol.HF)
    nll = count = 0
    for doc in (d_ for d_ in docs if len(d_) >= length):
        t, c = _hf_nll(model, doc if stride else doc[:length], length, stride)
        nll, count = nll + t, count + c
    assert got["docs"] == 3 and got["tokens"] == count
    assert got["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("stride", [16, 63], ids=["overlapping", "adjacent"])
def test_yarn_protocol_equals_the_authors_loop(model_dir, stride):
    """The paper's protocol against a plain re-write of the authors' loop on the transformers model: BOS in
    front of every window, exp of the mean of window means, every document taking part."""
    from tests.reference import yarn_eval

    d, model = model_dir
    cfg, params = convert.load_hf(d, dtype="float32")
    rng = np.random.default_rng(1)
    docs = [np.concatenate([[1], rng.integers(3, 512, n - 1)]).astype(np.int32) for n in (150, 97, 64, 40)]
    got = perplexity.evaluate(cfg, params, docs, 64, stride=stride, batch_size=3)  # the default: YARN
    want = yarn_eval.sliding_window_perplexity(model, [list(x[1:]) for x in docs], 1, 64, stride)
    assert got["docs"] == 4 and got["tokens"] == sum(len(x) - 1 for x in docs)
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)


def test_passkey_prompt_is_the_authors():
    from tests.reference import yarn_eval

    for chars, prefix, key in [(0, 0, 1), (100, 37, 50000), (5000, 4999, 12345), (150_000, 1000, 7)]:
        assert passkey.yarn_text(chars, prefix, key) == yarn_eval.passkey_prompt(chars, prefix, key)
    tok = WordTokenizer()
    trial_list = passkey.trials(tok.encode, 1, [200, 400], 40, seed=3)
    assert all(len(t.prompt) <= t.length for t in trial_list)
    assert len(trial_list[-1].prompt) > 0.9 * 400  # filled close to the length
    assert all(1 <= t.key <= 50000 for t in trial_list) and len({t.key for t in trial_list}) > 30
    assert passkey.ANSWER_TOKENS == 10


def test_windows_score_every_token_once():
    for n, length, stride in [(100, 32, 8), (31, 32, 8), (257, 64, 1), (1000, 256, 255)]:
        scored = [i for _, end, first in perplexity.windows(n, length, stride) for i in range(first, end)]
        assert scored == list(range(1, n))
    # stride == length (no overlap): as in transformers' recipe, a window's first token has no context
    # inside the window and is not scored
    scored = [i for _, end, first in perplexity.windows(1000, 256, 256) for i in range(first, end)]
    assert scored == [i for i in range(1, 1000) if i % 256]


def test_bad_input_is_a_clear_error():
    docs = [np.zeros(50, np.int32)]
    with pytest.raises(ValueError, match="no document has 64 tokens \\(the longest has 50\\)"):
        perplexity.plan(docs, 64, 16)
    with pytest.raises(ValueError, match="--sliding-window: expected a positive stride, got 0"):
        perplexity.plan(docs, 32, 0)


class WordTokenizer:
    """One id per distinct word: enough to build prompts and read them back."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text):
        return [self.ids.setdefault(w, len(self.ids) + 3) for w in text.split()]

    def decode(self, ids):
        words = {i: w for w, i in self.ids.items()}
        return " ".join(words.get(int(i), "") for i in ids)


def test_passkey_scorer_and_depths():
    tok = WordTokenizer()
    trial_list = passkey.trials(tok.encode, 1, [200, 400], 300, seed=1, protocol=passkey.Protocol.SENTENCES)
    knows = lambda p: " " + re.search(r"pass key is (\d+)", tok.decode(p)).group(1) + ". Done."  # noqa: E731
    batches = []
    always = passkey.score(trial_list, lambda ps: batches.append(len(ps)) or [knows(p) for p in ps], batch=7)
    assert set(batches) == {7} and len(always) == len(trial_list)  # the last group padded, its extras dropped
    never = passkey.score(trial_list, lambda ps: [" I do not know."] * len(ps))
    assert passkey.accuracy(always)[0] == {200: 1.0, 400: 1.0}
    assert passkey.accuracy(never)[0] == {200: 0.0, 400: 0.0}
    depths = np.asarray([t.depth for t in trial_list])
    counts, _ = np.histogram(depths, bins=10, range=(0, 1))
    assert np.all(np.abs(counts - 60) < 4 * np.sqrt(60))  # uniform within 4 sigma per bin
    assert all(len(t.prompt) <= t.length for t in trial_list)
    # the key line really sits at the drawn depth of the filler
    for t in trial_list[:50]:
        words = tok.decode(t.prompt).split()
        fillers_before = " ".join(words).split("The pass key is")[0].count("grass")
        total = " ".join(words).count("grass")
        assert abs(fillers_before / total - t.depth) <= 0.5 / total + 1e-9
    assert passkey.first_integer(" 12345. 678") == 12345 and passkey.first_integer("none") is None


def test_cli_writes_tables_and_plots(model_dir, tmp_path):
    d, _ = model_dir
    tok = tokenizer_lib.train_sentencepiece(corpus(), 512, tmp_path / "spm")
    out = tmp_path / "ppl"
    rc = cli.main(["perplexity", "--hf", str(d), "--tokenizer", tok, "--data", corpus()[0], "--data", corpus()[1],
                   "--lengths", "64,128", "--sliding-window", "32", "--rope", "none",
                   "--rope", "linear:factor=4", "--out", str(out), "--dtype", "float32", "--batch-size", "2"])
    assert rc == 0
    rows = json.loads((out / "perplexity.json").read_text())
    assert len(rows) == 4 and all(r["perplexity"] > 1 for r in rows)
    assert (out / "perplexity.csv").read_text().startswith("model,length,perplexity")
    assert (out / "perplexity.png").stat().st_size > 10_000
    rc = cli.main(["passkey", "--hf", str(d), "--tokenizer", tok, "--lengths", "200", "--trials", "2",
                   "--out", str(tmp_path / "pk"), "--dtype", "float32"])
    assert rc == 0 and (tmp_path / "pk/passkey.png").exists()
    assert len(json.loads((tmp_path / "pk/passkey.json").read_text())) == 2


def test_cli_errors(model_dir, tmp_path):
    d, _ = model_dir
    big = tokenizer_lib.train_sentencepiece(corpus(), 1024, tmp_path / "spm")
    rc = cli.main(["perplexity", "--hf", str(d), "--tokenizer", big, "--data", corpus()[0], "--lengths", "64",
                   "--out", str(tmp_path / "x")])
    assert rc == 2  # 1024 pieces for a 512-token model
    small = tokenizer_lib.train_sentencepiece(corpus(), 512, tmp_path / "spm")
    for extra, in [(["--sliding-window", "0"],), (["--lengths", "99999999"],)]:
        args = ["perplexity", "--hf", str(d), "--tokenizer", small, "--data", corpus()[0], "--lengths", "64",
                "--out", str(tmp_path / "x"), *extra]
        assert cli.main(args) == 2
    assert not (tmp_path / "x").exists()


def test_passkey_on_a_seq_mesh_answers_as_one_device(model_dir, tmp_path):
    """--mesh seq=4 with --batch-size 2: two prompts of their own lengths at once (the third padded with a
    copy), prefilled with ring attention, the cache split over seq: the answers of one device, one prompt
    at a time."""
    d, _ = model_dir
    tok = tokenizer_lib.train_sentencepiece(corpus(), 512, tmp_path / "spm")
    args = ["passkey", "--hf", str(d), "--tokenizer", tok, "--lengths", "200", "--trials", "3", "--dtype", "float32"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "ring"), "--mesh", "seq=4,tensor=2", "--batch-size", "2"]) == 0
    one, ring = (json.loads((tmp_path / k / "passkey.json").read_text()) for k in ("one", "ring"))
    assert [r["answer"] for r in ring] == [r["answer"] for r in one] and len(one) == 3
