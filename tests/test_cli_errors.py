"""Bad input to the command lines: one line `error: <field or file>: ...`, the right exit status, no traceback.

Each row runs the entry point in this process on the tiny config with one thing wrong and checks that the
message names the field or file. Rows fail before any step runs (validation comes first).
"""

import gzip
import os

import pytest

from tests.train_helpers import ROOT
from yarn_jax import train, workdir

TINY = str(ROOT / "configs" / "tiny.py")


def _text(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _not_spm(tmp_path):
    return _text(tmp_path, "tok.model", b"this is not a sentencepiece model\n")


# (id, argv after the program name (WORK: the work directory, TMP: tmp_path), setup, message)
TRAIN_ROWS = [
    ("missing-config", ["--config=nope.py", "--workdir=WORK"], None, "--config: nope.py does not exist"),
    ("no-config", ["--workdir=WORK"], None, "--config: required"),
    ("no-workdir", [f"--config={TINY}"], None, "--workdir: required"),
    ("unknown-key", [f"--config={TINY}", "--workdir=WORK", "--config.foo.bar=1"], None,
     "--config.foo.bar: no such key"),
    ("bad-float", [f"--config={TINY}", "--workdir=WORK", "--config.optim.lr=abc"], None, "config.optim.lr=abc"),
    ("workdir-is-file", [f"--config={TINY}", "--workdir=TMP/file"], lambda t: (t / "file").write_text("x"),
     "--workdir: .*file is a file"),
    ("workdir-under-file", [f"--config={TINY}", "--workdir=TMP/file/run"], lambda t: (t / "file").write_text("x"),
     "--workdir: .*file/run is not writable"),
    ("steps-negative", [f"--config={TINY}", "--workdir=WORK", "--config.train.steps=-5"], None, "train.steps"),
    ("save-every-0", [f"--config={TINY}", "--workdir=WORK", "--config.train.save_every=0"], None, "train.save_every"),
    ("keep-negative", [f"--config={TINY}", "--workdir=WORK", "--config.train.keep=-1"], None,
     "train.keep: expected an integer >= 0 \\(0 keeps every checkpoint\\)"),
    ("grad-accum", [f"--config={TINY}", "--workdir=WORK", "--config.train.grad_accum=3"], None,
     "train.grad_accum: expected a divisor of data.batch_size"),
    ("batch-0", [f"--config={TINY}", "--workdir=WORK", "--config.data.batch_size=0"], None, "data.batch_size"),
    ("seq-over-max-pos", [f"--config={TINY}", "--workdir=WORK", "--config.data.seq_len=100000"], None,
     "data.seq_len: 100000 is above the model's max_position_embeddings"),
    ("no-match", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/none/*.txt',)"], None,
     "data.sources: .*matches no file"),
    ("gzip", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/a.txt.gz',)"],
     lambda t: _text(t, "a.txt.gz", gzip.compress(b"hello " * 100)), "data.sources: .*a.txt.gz is gzip"),
    ("binary", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/a.bin',)"],
     lambda t: _text(t, "a.bin", bytes(range(256)) * 10), "data.sources: .*a.bin is binary"),
    ("not-utf8", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/a.txt',)"],
     lambda t: _text(t, "a.txt", "caf\xe9 ".encode("latin-1") * 100), "data.sources: .*a.txt is not UTF-8"),
    ("empty", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/e*.txt',)"],
     lambda t: [_text(t, f"e{i}.txt", b"") for i in range(2)], "data.sources: every file is empty"),
    ("not-sentencepiece", [f"--config={TINY}", "--workdir=WORK", "--config.data.tokenizer=TMP/tok.model"],
     _not_spm, "data.tokenizer: .*tok.model is neither a SentencePiece model nor a Hugging Face tokenizer.json"),
    ("positions", [f"--config={TINY}", "--workdir=WORK", "--config.data.positions=sometimes"], None,
     "data.positions: expected"),
    ("config-syntax", ["--config=TMP/c.py", "--workdir=WORK"], lambda t: _text(t, "c.py", b"def get_config(:\n"),
     "--config: .*c.py, line 1: invalid syntax"),
    ("config-import", ["--config=TMP/c.py", "--workdir=WORK"],
     lambda t: _text(t, "c.py", b"import no_such_module\ndef get_config():\n    pass\n"),
     "--config: .*c.py: No module named 'no_such_module'"),
    ("config-no-get-config", ["--config=TMP/c.py", "--workdir=WORK"], lambda t: _text(t, "c.py", b"x = 1\n"),
     "--config: .*c.py defines no get_config"),
    ("config-directory", ["--config=TMP", "--workdir=WORK"], None, "--config: .* is a directory; expected a config"),
    ("key-typo", [f"--config={TINY}", "--workdir=WORK", "--config.optim.lrr=1e-3"], None,
     "--config.optim.lrr: no such key in the run config \\(did you mean 'lr'\\?\\)"),
    ("section-as-value", [f"--config={TINY}", "--workdir=WORK", "--config.rope=yarn"], None,
     "--config.rope: is a section of the run config, not a value"),
    ("sources-string", ["--config=TMP/c.py", "--workdir=WORK"],
     lambda t: _text(t, "c.py", b"from yarn_jax.run_config import base\n\ndef get_config():\n    c = base()\n"
                     b"    c.data.sources = 'a.txt'\n    return c\n"),
     "--config: .*c.py: TypeError: Could not override field 'sources'"),
    ("sources-only-directories", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/d*',)"],
     lambda t: (t / "d1").mkdir(), "data.sources: .*d\\*' matches only directories"),
    ("jsonl-not-text", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/a.jsonl',)",
                        "--config.data.format=jsonl"], lambda t: _text(t, "a.jsonl", b'{"text": 5}\n'),
     "a.jsonl: the record at byte 0 has a int in 'text'; expected text"),
    ("jsonl-not-json", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/a.jsonl',)",
                        "--config.data.format=jsonl"], lambda t: _text(t, "a.jsonl", b'{"text": "a"\n'),
     "a.jsonl: the line at byte 0 is not JSON"),
    ("skip-all-docs", [f"--config={TINY}", "--workdir=WORK", "--config.data.skip_docs=100000"], None,
     "data.skip_docs: 100000 held-out documents leave none of the"),
    ("vocab-too-large", [f"--config={TINY}", "--workdir=WORK", "--config.data.sources=('TMP/a.txt',)"],
     lambda t: _text(t, "a.txt", b"tiny text\n" * 20),
     "data.tokenizer_vocab: cannot train a SentencePiece model of 1024"),
    ("init-from-other-shape", [f"--config={TINY}", "--workdir=WORK", "--config.init_from=TMP/ckpt"],
     lambda t: _checkpoint(t), "model.head_dim: 32 in the run config, but init_from .*ckpt holds 16"),
]


@pytest.mark.parametrize("argv,setup,message", [r[1:] for r in TRAIN_ROWS], ids=[r[0] for r in TRAIN_ROWS])
def test_train_bad_input_is_one_line_naming_the_field(argv, setup, message, tmp_path, capsys):
    if setup:
        setup(tmp_path)
    argv = [a.replace("WORK", str(tmp_path / "work")).replace("TMP", str(tmp_path)) for a in argv]
    assert train.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert __import__("re").search(message, lines[0]), (message, lines[0])


def test_a_second_trainer_on_a_busy_workdir_is_refused(tmp_path, capsys):
    lock = workdir.Lock(workdir.prepare(tmp_path))  # what a running trainer holds
    try:
        assert train.main(["train", f"--config={TINY}", f"--workdir={tmp_path}"]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert f"error: --workdir: {tmp_path} is in use by another trainer (pid {os.getpid()})" in err, err


def test_print_config_lists_every_key(capsys):
    assert train.main(["train", f"--config={TINY}", "--print_config", "--config.optim.lr=0.001"]) == 0
    out = capsys.readouterr().out
    for key in ("grad_accum", "save_every", "keep", "tokenizer_vocab", "positions", "ring_layout", "lr: 0.001"):
        assert key in out, key


def _checkpoint(tmp_path):
    """TMP/hf (a 2-layer Llama, vocabulary 400, with a byte-level BPE tokenizer.json) and TMP/ckpt from it."""
    from yarn_jax import convert

    _hf_with_tokenizer(tmp_path)
    convert.from_hf(tmp_path / "hf", tmp_path / "ckpt")


def _hf_with_tokenizer(tmp_path):
    from tests import hf_models
    from tests.test_tokenizer import make_bpe

    hf_models.hf_model(hf_models.hf_config(vocab=400)).save_pretrained(tmp_path / "hf")
    make_bpe(tmp_path / "hf", bos=True)
    (tmp_path / "doc.txt").write_text(open(__file__).read())


def _hf_and_file(tmp_path):
    from tests import hf_models

    hf_models.hf_model(hf_models.hf_config()).save_pretrained(tmp_path / "hf")
    (tmp_path / "file").write_text("x")


def _status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


def _eval(*extra):
    return ["perplexity", "--hf", "TMP/hf", "--data", "TMP/doc.txt", "--lengths", "64", "--out", "TMP/out", *extra]


def _passkey(*extra):
    return ["passkey", "--hf", "TMP/hf", "--lengths", "64", "--out", "TMP/out", *extra]


# (id, entry point, argv, setup, message); all exit with status 2
OTHER_ROWS = [
    ("eval-lengths", "eval", _eval()[:-4] + ["--lengths", "128,abc", "--out", "TMP/out"], None,
     "argument --lengths: expected comma-separated positive integers, got '128,abc'"),
    ("eval-batch-0", "eval", _eval("--batch-size", "0"), None, "argument --batch-size: expected an integer >= 1"),
    ("eval-docs-negative", "eval", _eval("--docs", "-1"), None, "argument --docs: expected an integer >= 0"),
    ("eval-rope-number", "eval", _eval("--rope", "yarn:factor=abc"), None,
     "--rope yarn:factor=abc: factor: expected a number"),
    ("eval-mesh", "eval", _eval("--mesh", "seq=x"), None, "--mesh: expected AXIS=SIZE"),
    ("eval-out-unwritable", "eval", _eval()[:-2] + ["--out", "TMP/file/out"], lambda t: (t / "file").write_text("x"),
     "--out: .*file/out is not writable \\(.*file is a file\\)"),
    ("passkey-trials-0", "eval", _passkey("--trials", "0"), None, "argument --trials: expected an integer >= 1"),
    ("generate-no-tokenizer", "generate", ["--checkpoint", "TMP/ckpt", "--prompt", "hi"],
     lambda t: _hf_and_file(t) or __import__("yarn_jax.convert").convert.from_hf(t / "hf", t / "ckpt"),
     "--tokenizer: required: --checkpoint .*ckpt carries no tokenizer"),
    ("generate-max-new", "generate", ["--hf", "TMP/hf", "--prompt", "hi", "--max-new", "-3"], None,
     "argument --max-new: expected an integer >= 1"),
    ("generate-temperature", "generate", ["--hf", "TMP/hf", "--prompt", "hi", "--temperature", "-1"], None,
     "--temperature: expected a finite number >= 0"),
    ("generate-temperature-nan", "generate", ["--hf", "TMP/hf", "--prompt", "hi", "--temperature", "nan"], None,
     "--temperature: expected a finite number >= 0 \\(0 is greedy\\), got nan"),
    ("eval-rope-typo", "eval", _eval("--rope", "yarn:factr=8"), _hf_and_file,
     "rope.factr: not a key of rope type 'yarn'"),
    ("eval-stride-past-window", "eval", _eval("--sliding-window", "100"), _hf_with_tokenizer,
     "--sliding-window: a stride of 100 tokens is longer than the windows at length 64"),
    ("eval-min-doc-tokens", "eval", _eval("--min-doc-tokens", "10000000"), _hf_with_tokenizer,
     "--min-doc-tokens: no document has 10000000 tokens"),
    ("eval-data-directory", "eval", _eval()[:4] + ["TMP"] + _eval()[5:], _hf_with_tokenizer,
     "--data: .* matches only directories"),
    ("passkey-seed-negative", "eval", _passkey("--seed", "-1"), None, "argument --seed: expected an integer >= 0"),
    ("generate-cache-too-large", "generate", ["--hf", "TMP/hf", "--prompt", "hi", "--max-new", "2000000000"],
     _hf_with_tokenizer, "max_new \\(--max-new\\): a KV cache of .* GiB per device and the decode loop's "
     "copy of the layers' weights .* GiB, more than"),
    ("generate-hf-is-a-checkpoint", "generate", ["--hf", "TMP/ckpt", "--prompt", "hi"], _checkpoint,
     "ckpt/config.json: missing .*an Orbax checkpoint\\? use --checkpoint"),
    ("convert-missing-config", "convert", ["from-hf", "TMP/nothing", "TMP/ckpt"], None, "config.json: missing"),
    ("convert-yarn-without-factor", "convert", ["from-hf", "TMP/hf", "TMP/ckpt", "--rope-type", "yarn"],
     _hf_and_file, "rope.factor: required for rope type 'yarn'"),
    ("convert-extended-below-trained", "convert", ["from-hf", "TMP/hf", "TMP/ckpt", "--rope-type", "yarn",
                                                   "--factor", "4", "--max-position-embeddings", "32"], _hf_and_file,
     "max_position_embeddings: the extended length 32 is below original_max_position_embeddings 64"),
    ("convert-tokenizer-not-one", "convert", ["to-hf", "TMP/ckpt", "TMP/out", "--tokenizer", "TMP/doc.txt"],
     _checkpoint, "--tokenizer: .*doc.txt is neither a SentencePiece model nor"),
    ("convert-output-under-file", "convert", ["from-hf", "TMP/hf", "TMP/file/ckpt"], _hf_and_file,
     "file: already exists|file/ckpt: a parent is not a directory"),
    ("aot-missing-config", "aot", ["--config", "nope.py", "--topology", "v4-8"], None,
     "--config: nope.py does not exist"),
    ("aot-unknown-key", "aot", ["--config", TINY, "--topology", "v4-8", "--config.foo.bar=1"], None,
     "--config.foo.bar: no such key in the run config"),
    ("aot-unknown-key-old-spelling", "aot", ["--config", TINY, "--topology", "v4-8", "--set", "foo.bar=1"], None,
     "--config.foo.bar: no such key in the run config"),
    ("aot-bad-type", "aot", ["--config", TINY, "--topology", "v4-8", "--config.optim.lr=abc"], None,
     "--config.optim.lr=abc: could not convert string to float"),
    ("aot-slices-0", "aot", ["--config", TINY, "--topology", "v4-8", "--num-slices", "0"], None,
     "argument --num-slices: expected an integer >= 1"),
]


@pytest.mark.parametrize("entry,argv,setup,message", [r[1:] for r in OTHER_ROWS], ids=[r[0] for r in OTHER_ROWS])
def test_other_commands_bad_input_is_one_line_naming_the_flag(entry, argv, setup, message, tmp_path, capsys):
    import importlib

    if setup:
        setup(tmp_path)
    module = importlib.import_module({"eval": "yarn_jax.eval.__main__", "generate": "yarn_jax.generate",
                                      "convert": "yarn_jax.convert", "aot": "yarn_jax.aot"}[entry])
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    assert _status(module.main, argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert __import__("re").search(message, lines[0]), (message, lines[0])
    assert not (tmp_path / "out" / "passkey.csv").exists()  # nothing half-written



def test_an_exit_with_a_message_is_printed_in_one_line(capsys):
    """SystemExit("...") inside a command (not argparse's, which prints its own line) is a user error:
    its message is printed as one line, not swallowed."""
    from yarn_jax import cli

    def job():
        raise SystemExit("--lengths: expected a comma list of integers\nsecond line")

    assert cli.run(job) == cli.BAD_INPUT
    assert capsys.readouterr().err == "error: --lengths: expected a comma list of integers second line\n"


def test_commands_claim_most_of_a_gpu_unless_told(monkeypatch):
    """Every command runs with 95% of a GPU's memory for XLA (its default 75% leaves a 7B step on one
    H200 short); a fraction the user set is kept."""
    from yarn_jax import cli

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert cli.run(lambda: 0) == 0 and os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert cli.run(lambda: 0) == 0 and os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


def test_out_of_device_memory_is_one_line_with_what_to_change(capsys):
    """XLA's RESOURCE_EXHAUSTED (a step or cache too big for the device) is a failed run, said in one line
    with the settings that shrink it; any other XLA runtime error keeps its traceback (a bug)."""
    import jax

    from yarn_jax import cli

    def job(message):
        def raising():
            raise jax.errors.JaxRuntimeError(message)
        return raising

    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 59.70GiB with allocator GPU_0_bfc.\nmore"
    assert cli.run(job(oom)) == cli.FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory")
    assert "59.70GiB" in err and "'offload'" in err and "mesh.seq" in err and "more" not in err.split(")")[0]
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        cli.run(job("INTERNAL: a compiler bug"))

