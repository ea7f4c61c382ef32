"""The grain pipeline on a real multi-file corpus: nothing lost or duplicated, BOS/EOS once per document,
positions as configured, deterministic and resumable."""

import numpy as np
import pytest

from tests.train_helpers import corpus
from yarn_jax import data


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return data.train_tokenizer(corpus(), 512, tmp_path_factory.mktemp("spm"))


def _cfg(tokenizer, **kw):
    return data.DataConfig(**{**dict(sources=tuple(corpus()), tokenizer=tokenizer, seq_len=128, batch_size=2,
                                     num_epochs=1), **kw})


def _all(cfg):
    return list(data.dataset(cfg))


def test_one_epoch_loses_and_duplicates_nothing(tokenizer):
    cfg = _cfg(tokenizer, shuffle=True, seed=3)
    batches = _all(cfg)
    stream = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    sp = data.load_tokenizer(tokenizer)
    order = list(data.documents(cfg).shuffle(seed=3))
    docs = [np.asarray([sp.bos_id(), *sp.encode(data._read_text(f)), sp.eos_id()]) for f in order]
    want = np.concatenate(docs)
    # concat-then-split: the emitted chunks are the concatenation cut into seq_len pieces; only the tail of the
    # last, partial batch is dropped
    assert len(want) - len(stream) < cfg.seq_len * cfg.batch_size
    np.testing.assert_array_equal(stream, want[: len(stream)])
    ends = np.cumsum([len(d) for d in docs])
    started, completed = int((ends - [len(d) for d in docs] < len(stream)).sum()), int((ends <= len(stream)).sum())
    assert (stream == sp.bos_id()).sum() == started  # BOS exactly once per document
    assert (stream == sp.eos_id()).sum() == completed  # EOS exactly once per document
    assert completed > 5


def test_document_positions_restart_and_chunk_positions_run(tokenizer):
    sp = data.load_tokenizer(tokenizer)
    for b in _all(_cfg(tokenizer, positions="document"))[:20]:
        for tok, pos, seg in zip(b["tokens"], b["positions"], b["segment_ids"], strict=True):
            starts = np.flatnonzero(np.diff(seg)) + 1
            assert all(pos[s] == 0 for s in starts)  # a new segment starts at position 0
            assert all(tok[s] == sp.bos_id() for s in starts)  # ... and with BOS
            inside = np.ones(len(pos), bool)
            inside[starts] = False
            inside[0] = False
            assert np.all(np.diff(pos)[inside[1:]] == 1)
    for b in _all(_cfg(tokenizer, positions="chunk"))[:5]:
        assert (b["positions"] == np.arange(128)).all() and (b["segment_ids"] == 1).all()


def test_deterministic_and_resumable(tokenizer):
    cfg = _cfg(tokenizer, num_epochs=None)
    a = data.Batches(cfg)
    first = [next(a)["tokens"] for _ in range(3)]
    state = a.get_state()
    rest = [next(a)["tokens"] for _ in range(3)]
    b = data.Batches(cfg)
    np.testing.assert_array_equal(np.stack([next(b)["tokens"] for _ in range(3)]), np.stack(first))
    c = data.Batches(cfg)
    c.set_state(state)
    np.testing.assert_array_equal(np.stack([next(c)["tokens"] for _ in range(3)]), np.stack(rest))


def test_processes_split_the_same_global_batches(tokenizer):
    cfg = _cfg(tokenizer, batch_size=4)
    whole = [b["tokens"] for b in data.dataset(cfg)]
    halves = [[b["tokens"] for b in data.dataset(cfg, i, 2)] for i in range(2)]
    for w, a, b in zip(whole, *halves, strict=True):
        np.testing.assert_array_equal(np.concatenate([a, b]), w)


def test_jsonl_source(tokenizer, tmp_path):
    import json

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 50}) for i in range(20)))
    batches = _all(_cfg(tokenizer, sources=(str(path),), format="jsonl"))
    assert len(batches) > 0
    bad = _cfg(tokenizer, sources=(str(path),), format="jsonl", field="body")
    with pytest.raises(ValueError, match="has no field 'body'"):
        _all(bad)


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="data.sources: '/nope/\\*' matches no file"):
        _all(_cfg(tokenizer, sources=("/nope/*",)))
    with pytest.raises(ValueError, match="data.format: expected one of"):
        _cfg(tokenizer, format="csv")
    with pytest.raises(ValueError, match="data.tokenizer: /nope.model does not exist"):
        data.load_tokenizer("/nope.model")


def test_tokenizer_is_the_same_in_every_process(tmp_path):
    """Trained twice, each in a fresh process and on a line sample (SentencePiece's own sampler gave
    other pieces in every process): the same pieces and scores."""
    import subprocess
    import sys

    script = ("import sys; from tests.train_helpers import corpus; from yarn_jax import data; "
              "data.TOKENIZER_LINES = 1500; "
              "from sentencepiece import sentencepiece_model_pb2 as pb; m = pb.ModelProto(); "
              "m.ParseFromString(open(data.train_tokenizer(corpus(), 400, sys.argv[1]), 'rb').read()); "
              "print([(p.piece, p.score) for p in m.pieces])")
    pieces = [subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True,
                             capture_output=True, text=True).stdout for i in range(2)]
    assert pieces[0] and pieces[0] == pieces[1]
