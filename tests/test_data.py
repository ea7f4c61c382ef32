"""The grain pipeline on a real multi-file corpus: nothing lost or duplicated, BOS/EOS once per document,
positions as configured, deterministic and resumable."""

import dataclasses

import numpy as np
import pytest

from tests.train_helpers import corpus
from yarn_jax.io import data
from yarn_jax.io import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizer_lib.train_sentencepiece(corpus(), 512, tmp_path_factory.mktemp("spm"))


def _cfg(tokenizer, **kw):
    return data.DataConfig(**{**dict(sources=tuple(corpus()), tokenizer=tokenizer, seq_len=128, batch_size=2,
                                     num_epochs=1), **kw})


def _all(cfg):
    return list(data.dataset(cfg))


def test_one_epoch_loses_and_duplicates_nothing(tokenizer):
    cfg = _cfg(tokenizer, shuffle=True, seed=3)
    batches = _all(cfg)
    # the epoch's last chunk is padded with id 0 (unk: never produced, the tokenizer falls back to bytes)
    stream = np.trim_zeros(np.concatenate([b["tokens"].reshape(-1) for b in batches]), "b")
    sp = tokenizer_lib.load(tokenizer)
    order = list(data.documents(cfg).shuffle(seed=3))
    docs = [np.asarray([sp.bos_id, *sp.encode(data._read_text(f)), sp.eos_id]) for f in order]
    want = np.concatenate(docs)
    # concat-then-split: the emitted chunks are the concatenation cut into seq_len pieces; only the tail of the
    # last, partial batch is dropped
    assert len(want) - len(stream) < cfg.seq_len * cfg.batch_size
    np.testing.assert_array_equal(stream, want[: len(stream)])
    ends = np.cumsum([len(d) for d in docs])
    started, completed = int((ends - [len(d) for d in docs] < len(stream)).sum()), int((ends <= len(stream)).sum())
    assert (stream == sp.bos_id).sum() == started  # BOS exactly once per document
    assert (stream == sp.eos_id).sum() == completed  # EOS exactly once per document
    assert completed > 5


def test_document_positions_restart_and_chunk_positions_run(tokenizer):
    sp = tokenizer_lib.load(tokenizer)
    for b in _all(_cfg(tokenizer, positions="document"))[:20]:
        for tok, pos, seg in zip(b["tokens"], b["positions"], b["segment_ids"], strict=True):
            starts = np.flatnonzero(np.diff(seg)) + 1
            assert all(pos[s] == 0 for s in starts)  # a new segment starts at position 0
            assert all(tok[s] == sp.bos_id for s in starts)  # ... and with BOS
            inside = np.ones(len(pos), bool)
            inside[starts] = False
            inside[0] = False
            assert np.all(np.diff(pos)[inside[1:]] == 1)
    for b in _all(_cfg(tokenizer, positions="chunk"))[:5]:
        assert (b["positions"] == np.arange(128)).all() and (b["segment_ids"] == 1).all()


def _segments(row: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The tokens of each segment of a row (padding, segment 0, left out)."""
    seg = row["segment_ids"]
    return [row["tokens"][seg == s] for s in np.unique(seg[seg > 0])]


def test_fit_packing_cuts_only_at_row_multiples_and_loses_nothing(tokenizer, tmp_path):
    """One epoch packed by first fit: the pieces are exactly every document cut at multiples of seq_len
    (a document that fits a row arrives whole), each piece once; the rest of a row is segment 0."""
    for i in range(30):  # short documents besides the long source files
        (tmp_path / f"{i:02d}.txt").write_text(" ".join(f"word{j}" for j in range(3 * i + 1)))
    cfg = _cfg(tokenizer, sources=(*corpus()[:4], str(tmp_path / "*.txt")), shuffle=False, packing="fit",
               positions="document", batch_size=1, seq_len=256)
    rows = [{k: v[0] for k, v in b.items()} for b in _all(cfg)]
    sp = tokenizer_lib.load(tokenizer)
    docs = [np.asarray([sp.bos_id, *sp.encode(data._read_text(f)), sp.eos_id]) for f in data.documents(cfg)]
    want = sorted(tuple(d[i:i + 256]) for d in docs for i in range(0, len(d), 256))
    got = sorted(tuple(t) for r in rows for t in _segments(r))
    assert got == want
    assert any(len(d) <= 256 for d in docs) and any(len(d) > 256 for d in docs)
    for r in rows:  # padding only at the end of a row, positions restart per piece
        seg = r["segment_ids"]
        assert np.all(np.diff((seg > 0).astype(int)) <= 0) and np.all(r["tokens"][seg == 0] == 0)
    chunk = _all(dataclasses.replace(cfg, positions="chunk"))
    for b, r in zip(chunk, rows, strict=True):  # chunk positions: the same rows, one segment besides padding
        np.testing.assert_array_equal(b["tokens"][0], r["tokens"])
        np.testing.assert_array_equal(b["segment_ids"][0], (r["segment_ids"] > 0).astype(int))
        assert (b["positions"][0] == np.arange(256)).all()


def test_fit_packing_resumes(tokenizer):
    cfg = _cfg(tokenizer, num_epochs=None, packing="fit", seq_len=256)
    a = data.Batches(cfg)
    [next(a) for _ in range(2)]
    state = a.get_state()
    rest = [next(a)["tokens"] for _ in range(3)]
    c = data.Batches(cfg)
    c.set_state(state)
    np.testing.assert_array_equal(np.stack([next(c)["tokens"] for _ in range(3)]), np.stack(rest))


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
    with pytest.raises(ValueError, match=r"data.packing: expected one of \['concat', 'fit'\], got 'best'"):
        _cfg(tokenizer, packing="best")
    with pytest.raises(ValueError, match="data.tokenizer: /nope.model does not exist"):
        tokenizer_lib.load("/nope.model", "data.tokenizer")


def test_tokenizer_is_the_same_in_every_process(tmp_path):
    """Trained twice, each in a fresh process and on a line sample (SentencePiece's own sampler gave
    other pieces in every process): the same pieces and scores."""
    import subprocess
    import sys

    script = ("import sys; from tests.train_helpers import corpus; from yarn_jax.io import tokenizer; "
              "tokenizer.TRAIN_LINES = 1500; "
              "from sentencepiece import sentencepiece_model_pb2 as pb; m = pb.ModelProto(); "
              "m.ParseFromString(open(tokenizer.train_sentencepiece(corpus(), 400, sys.argv[1]), 'rb').read()); "
              "print([(p.piece, p.score) for p in m.pieces])")
    pieces = [subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True,
                             capture_output=True, text=True).stdout for i in range(2)]
    assert pieces[0] and pieces[0] == pieces[1]
