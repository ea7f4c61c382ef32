"""The input pipeline (grain): documents -> tokenizer (SentencePiece or tokenizer.json) -> BOS/EOS bookends
-> rows of seq_len tokens (concat-then-split, or fit) -> per-process batches of (tokens, positions,
segment_ids).

`packing` says how documents (bookended with BOS and EOS) become rows of `seq_len` tokens:
  "concat"   concatenated and split into chunks (grain's ConcatThenSplitIterDataset), the paper's way: no
             padding, but most documents shorter than a row are cut in two;
  "fit"      a document is cut only at multiples of seq_len (so one that fits a row is never cut), and the
             pieces are packed whole into rows by first fit (grain's FirstFitPackIterDataset); the rest of a
             row is padding (segment id 0, no loss). For short structured documents (the miniature's
             passkey task) whose end must see their start.
`positions` says what the model sees:
  "chunk"    positions 0..T-1 in every row, no segment masking (the YaRN paper's PG19 chunks);
  "document" positions restart at each document (piece) and attention stays inside it.
The iterator's state is a small JSON dict saved with every checkpoint, so a resumed run sees exactly the
batches an uninterrupted one would. Worker count is pinned in the settings for the same reason.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from yarn_jax.io import tokenizer as tokenizer_lib
from yarn_jax.model.validate import member, set_field


class Format(enum.Enum):
    TEXT = "text"  # one document per file
    JSONL = "jsonl"  # one document per line, in `field`
    PARQUET = "parquet"  # one document per row, column `field`
    ARRAYRECORD = "arrayrecord"  # one document per record: text, or JSON with `field`


class Packing(enum.Enum):  # see the module docstring
    CONCAT = "concat"
    FIT = "fit"


class Positions(enum.Enum):  # see the module docstring
    CHUNK = "chunk"
    DOCUMENT = "document"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...]  # files or globs
    tokenizer: str  # SentencePiece .model, tokenizer.json, or a directory holding one (yarn_jax.io.tokenizer)
    seq_len: int
    batch_size: int  # global
    format: Format = Format.TEXT
    field: str = "text"  # jsonl/parquet column or arrayrecord JSON field
    positions: Positions = Positions.CHUNK
    packing: Packing = Packing.CONCAT
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    skip_docs: int = 0  # held-out documents at the start of the (sorted) source list

    def __post_init__(self):
        for name, kind in (("format", Format), ("positions", Positions), ("packing", Packing)):
            set_field(self, name, member(f"data.{name}", kind, getattr(self, name)))
        for name in ("seq_len", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"data.{name}: expected a positive integer, got {getattr(self, name)!r}")

    def settings(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (stored with every checkpoint); the
        tokenizer by its pieces, so a moved or re-trained cache does not block a resume but a different
        vocabulary does. `packing` is recorded only when it is not "concat" (checkpoints written before it
        existed resume)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: v.value if isinstance(v, enum.Enum) else list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if self.packing is Packing.CONCAT:
            del d["packing"]
        d["tokenizer"] = tokenizer_lib.load(self.tokenizer, "data.tokenizer").fingerprint()
        return d


def check_sources(sources: tuple[str, ...], format: Format, field: str = "text") -> None:  # noqa: A002
    """Refuses text sources that are not text (gzip, binary, not
    UTF-8) or hold no text at all, JSONL whose first record is not JSON with a string `field`, and Parquet
    without pyarrow, naming the file; reads the first 64 KiB of each text file, the first line of each
    JSONL file."""
    kind = member("data.format", Format, format)
    if kind is Format.PARQUET:
        _pyarrow()
    if kind is Format.JSONL:
        for f in expand(sources):
            _read_jsonl((f, 0), field)
    if kind is not Format.TEXT:
        return
    files, empty = expand(sources), 0
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        if not head:
            empty += 1
        elif head.startswith(b"\x1f\x8b"):
            raise ValueError(f"data.sources: {f} is gzip-compressed; format='text' reads plain UTF-8 text")
        elif b"\x00" in head:
            raise ValueError(f"data.sources: {f} is binary (NUL bytes); format='text' reads plain UTF-8 text")
        else:
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.start < len(head) - 3:  # not just a character cut at the end of the sample
                    raise ValueError(f"data.sources: {f} is not UTF-8 text (byte {e.start}); format='text' reads "
                                     "plain UTF-8 text") from None
    if files and empty == len(files):
        raise ValueError(f"data.sources: every file is empty ({len(files)} files, e.g. {files[0]})")


def expand(sources: tuple[str, ...], flag: str = "data.sources") -> list[str]:
    """Files matching the globs, sorted (a stable order on every host); a glob matching no file (nothing,
    or only directories) is an error naming `flag`."""
    files: list[str] = []
    for pattern in sources:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise ValueError(f"{flag}: {pattern!r} matches no file")
        found = [f for f in matched if os.path.isfile(f)]
        if not found:
            raise ValueError(f"{flag}: {pattern!r} matches only directories; give files or a glob such as "
                             f"'{pattern.rstrip('/')}/*.txt'")
        files += found
    return files


# ----------------------------------------------------------------------------- documents


def _text_docs(files: list[str], field: str) -> list[Any]:
    return [f for f in files if os.path.getsize(f)]  # one document per non-empty file, read lazily


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _jsonl_docs(files: list[str], field: str) -> list[Any]:
    docs = []
    for f in files:
        with open(f, "rb") as fh:
            offset = 0
            for line in fh:
                if line.strip():
                    docs.append((f, offset))
                offset += len(line)
    return docs


def _read_jsonl(ref: tuple[str, int], field: str) -> str:
    with open(ref[0], "rb") as fh:
        fh.seek(ref[1])
        line = fh.readline()
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ref[0]}: the line at byte {ref[1]} is not JSON ({e})") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{ref[0]}: the record at byte {ref[1]} has no field {field!r} (data.field)")
    if not isinstance(record[field], str):
        raise ValueError(f"{ref[0]}: the record at byte {ref[1]} has a {type(record[field]).__name__} in "
                         f"{field!r}; expected text")
    return record[field]


def _pyarrow():
    try:
        import pyarrow.parquet as pq  # optional: only parquet sources need it
    except ImportError:
        raise ValueError("data.format: 'parquet' needs pyarrow: pip install 'yarn_jax[parquet]'") from None
    return pq


def _parquet_docs(files: list[str], field: str) -> list[Any]:
    pq = _pyarrow()
    docs = []
    for f in files:
        table = pq.read_table(f, columns=[field])
        docs += [str(x) for x in table.column(field).to_pylist()]
    return docs


def _arrayrecord_docs(files: list[str], field: str) -> Any:
    return grain.sources.ArrayRecordDataSource(files)


_READERS = {Format.TEXT: _text_docs, Format.JSONL: _jsonl_docs, Format.PARQUET: _parquet_docs,
            Format.ARRAYRECORD: _arrayrecord_docs}


def _to_text(cfg: DataConfig, doc: Any) -> str:
    if cfg.format is Format.TEXT:
        return _read_text(doc)
    if cfg.format is Format.JSONL:
        return _read_jsonl(doc, cfg.field)
    if cfg.format is Format.ARRAYRECORD:
        raw = doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc
        return json.loads(raw)[cfg.field] if raw.lstrip().startswith("{") else raw
    return doc


# ----------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """Document -> {'tokens': [BOS, ..., EOS]} (either bookend only where the tokenizer has it; a picklable
    callable for grain)."""

    cfg: DataConfig

    def __call__(self, doc: Any) -> dict[str, np.ndarray]:
        tok = _tokenizer(self.cfg.tokenizer)
        ids = tok.with_bos(tok.encode(_to_text(self.cfg, doc)))
        return {"tokens": np.asarray(ids + ([] if tok.eos_id is None else [tok.eos_id]), np.int32)}


_TOKENIZERS: dict[str, tokenizer_lib.Tokenizer] = {}


def _tokenizer(path: str) -> tokenizer_lib.Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = tokenizer_lib.load(path, "data.tokenizer")
    return _TOKENIZERS[path]


# ----------------------------------------------------------------------------- the pipeline


def documents(cfg: DataConfig, flag: str = "data.sources") -> grain.MapDataset:
    """The documents of this configuration (held-out ones skipped), in a stable order."""
    docs = _READERS[cfg.format](expand(cfg.sources, flag), cfg.field)
    ds = grain.MapDataset.source(docs)
    if len(ds) == 0:
        raise ValueError(f"{flag}: no documents in {list(cfg.sources)}")
    if cfg.skip_docs >= len(ds):
        raise ValueError(f"data.skip_docs: {cfg.skip_docs} held-out documents leave none of the {len(ds)} to "
                         "train on")
    return ds[cfg.skip_docs:] if cfg.skip_docs else ds


def dataset(cfg: DataConfig, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches for this process: dicts of tokens, positions, segment_ids, each [batch / processes, T].

    Every process packs the same global stream and keeps its own rows of each global batch, so the
    global batches do not depend on the number of processes: a run restarted on another number of
    hosts, or compared with a single-process run, sees exactly the same data.
    """
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size: expected a multiple of the process count ({process_count}), "
                         f"got {cfg.batch_size}")
    ds = documents(cfg)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    docs = ds.repeat(cfg.num_epochs).map(_Tokenize(cfg)).to_iter_dataset()
    length = {"tokens": cfg.seq_len}
    if cfg.packing is Packing.CONCAT:
        packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct=length)
    else:
        pieces = grain.experimental.FlatMapIterDataset(docs, _Pieces(cfg.seq_len))
        packed = grain.experimental.FirstFitPackIterDataset(pieces, length_struct=length, seed=cfg.seed,
                                                            num_packing_bins=max(cfg.batch_size, FIT_BINS))
    batches = packed.map(_Fields(cfg.positions, cfg.seq_len)).batch(cfg.batch_size, drop_remainder=True)
    rows = cfg.batch_size // process_count
    # a background thread keeps two batches ready while the device computes (the state saved with a
    # checkpoint is that of the last batch handed out, not of the prefetched ones)
    return grain.experimental.ThreadPrefetchIterDataset(batches.map(_Rows(process_index * rows, rows)),
                                                        prefetch_buffer_size=2)


FIT_BINS = 16  # rows first fit fills at once (at least): more bins, less padding


@dataclasses.dataclass(frozen=True)
class _Pieces(grain.experimental.FlatMapTransform):
    """{'tokens': [n]} -> pieces of seq_len tokens and a shorter rest: cut only where a row must end."""

    seq_len: int

    def flat_map(self, x: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        t = x["tokens"]
        return [{"tokens": t[i:i + self.seq_len]} for i in range(0, len(t), self.seq_len)]


@dataclasses.dataclass(frozen=True)
class _Rows:
    start: int
    count: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.start:self.start + self.count] for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class _Fields:
    """Packed row -> tokens, positions, segment_ids [T] (segment 0: padding, only with fit packing)."""

    positions: Positions
    seq_len: int

    def __call__(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.positions is Positions.CHUNK:
            return {"tokens": x["tokens"], "positions": np.arange(self.seq_len, dtype=np.int32),
                    "segment_ids": (x["tokens_segment_ids"] > 0).astype(np.int32)}
        return {"tokens": x["tokens"], "positions": x["tokens_positions"].astype(np.int32),
                "segment_ids": x["tokens_segment_ids"].astype(np.int32)}


class Batches:
    """An iterator of batches with a JSON state (for checkpoints)."""

    def __init__(self, cfg: DataConfig, process_index: int = 0, process_count: int = 1):
        self.cfg = cfg
        self._it = iter(dataset(cfg, process_index, process_count))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._it.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(_tuples(state))

    def close(self) -> None:
        """Stops the prefetch thread now (grain's own clean-up at interpreter exit fails noisily)."""
        self._it.close()
        self._it = None  # the iterator's __del__ runs here, while the modules it needs still exist


def _tuples(x: Any) -> Any:
    """JSON turned grain's tuples into lists; grain compares some of them as tuples."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def stdlib_corpus() -> list[str]:
    """A real corpus on every machine: the Python standard library's own source files (long documents)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.glob("*.py") if p.stat().st_size > 2000)


def read_documents(sources: tuple[str, ...], format: Format = Format.TEXT,  # noqa: A002
                   field: str = "text", flag: str = "--data") -> list[str]:
    """The texts of every document in `sources` (evaluation reads whole documents, in order)."""
    cfg = DataConfig(sources=sources, tokenizer="", seq_len=1, batch_size=1, format=format, field=field,
                     shuffle=False)
    return [_to_text(cfg, doc) for doc in documents(cfg, flag)]
