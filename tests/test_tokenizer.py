"""Tokenizers behind one interface: a byte-level BPE `tokenizer.json` made here with the `tokenizers` library
(no download), with and without BOS, end to end through train, eval, generate and convert; the tokenizer a
checkpoint carries; `AutoTokenizer` on the export; the resume check by content."""

import json
import shutil

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tests import hf_models
from tests.train_helpers import corpus, tiny_run_config
from yarn_jax import cli, convert, generate, train
from yarn_jax.eval import __main__ as eval_main
from yarn_jax.io import checkpoint
from yarn_jax.io import tokenizer as tokenizer_lib

TEXT = "def f(x):\n    return x * 12345  # café"


def make_bpe(directory, *, bos: bool, vocab: int = 400):
    """A byte-level BPE trained on a few stdlib files (digits split one by one, then ByteLevel, as Llama 3 /
    Qwen / SmolLM2 do). bos: a post-processor that puts <s> in front (Llama 3's way); else none (Qwen's),
    the EOS then named by tokenizer_config.json alone."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((open(f).read() for f in corpus()), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def bpe(request, tmp_path_factory):
    return make_bpe(tmp_path_factory.mktemp("bpe"), bos=request.param), request.param


def test_the_interface_as_transformers_decides(bpe, tmp_path):
    path, bos = bpe
    tok = tokenizer_lib.load(path.parent)  # a directory holding tokenizer.json
    assert tok.bos_id == (1 if bos else None) and tok.eos_id == 2 and tok.vocab_size == 400
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and 1 not in ids and 2 not in ids
    assert [tok.backend.id_to_token(i) for i in tok.encode("12345")] == list("12345")  # digits one by one
    tok.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto(TEXT).input_ids == tok.with_bos(ids)  # what the trainer feeds, BOS first or not at all


def test_fingerprint_follows_content_not_place(bpe, tmp_path):
    path, bos = bpe
    moved = tmp_path / "elsewhere/tokenizer.json"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    shutil.copy(path.parent / "tokenizer_config.json", moved.parent)  # where its EOS is named
    assert tokenizer_lib.load(moved).fingerprint() == tokenizer_lib.load(path).fingerprint()
    other = make_bpe(tmp_path / "other", bos=bos, vocab=380)
    assert tokenizer_lib.load(other).fingerprint() != tokenizer_lib.load(path).fingerprint()


@pytest.mark.parametrize("make,message", [
    (lambda t: t, "is a directory without tokenizer.json or tokenizer.model"),
    (lambda t: (t / "data.jsonl").write_text('{"text": "hi"}\n') and t / "data.jsonl",
     "data.jsonl is neither a SentencePiece model nor a Hugging Face tokenizer.json"),
    (lambda t: (t / "tokenizer.json").write_text('{"model": 3}') and t / "tokenizer.json",
     "tokenizer.json is not a Hugging Face tokenizer.json"),
    (lambda t: t / "missing.model", "missing.model does not exist"),
])
def test_a_file_that_is_no_tokenizer_is_one_line_naming_it(tmp_path, make, message):
    with pytest.raises(ValueError, match=f"--tokenizer: .*{message}"):
        tokenizer_lib.load(make(tmp_path))


@pytest.fixture(scope="module")
def trained(bpe, tmp_path_factory):
    """A tiny run trained with the tokenizer.json (2 steps; the trainer tests' shapes, so their compiled
    step is reused)."""
    path, bos = bpe
    work = tmp_path_factory.mktemp("run")
    config = tiny_run_config(tmp_path_factory.mktemp("spm"), steps=2, save_every=2)
    config.data.tokenizer = str(path)
    assert train.Run(config, str(work)).train() == 2
    return work, config, path, bos


def test_a_run_keeps_its_tokenizer_and_every_command_uses_it(trained, tmp_path, capsys):
    work, _, path, bos = trained
    ckpts = work / "checkpoints"
    assert tokenizer_lib.load(checkpoint.tokenizer_of(ckpts)).fingerprint() == tokenizer_lib.load(path).fingerprint()
    doc = tmp_path / "doc.txt"
    doc.write_text(open(corpus()[0]).read())
    assert bos or eval_main.main(["perplexity", "--checkpoint", str(ckpts), "--data", str(doc), "--lengths", "64",
                           "--sliding-window", "32", "--out", str(tmp_path / "ppl"), "--dtype", "float32"]) == 0
    if not bos:  # evaluation without BOS (with one: the SentencePiece runs of tests/test_eval.py)
        assert eval_main.main(["passkey", "--checkpoint", str(ckpts), "--lengths", "256", "--trials", "1",
                               "--protocol", "sentences", "--out", str(tmp_path / "pk"), "--dtype", "float32"]) == 0
    assert generate.main(["--checkpoint", str(ckpts), "--prompt", "def", "--max-new", "3"]) == 0
    assert convert.main(["to-hf", str(ckpts), str(tmp_path / "hf")]) == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = tokenizer_lib.load(path)
    assert auto(TEXT).input_ids == tok.with_bos(tok.encode(TEXT))
    # what the trainer fed: the first document of its stream, bookended
    from yarn_jax.io import data

    first = data._Tokenize(data.DataConfig(sources=(str(doc),), tokenizer=str(path), seq_len=64,
                                           batch_size=1))(str(doc))["tokens"]
    want = auto(doc.read_text()).input_ids + [tok.eos_id]
    np.testing.assert_array_equal(first, want)
    assert (first[0] == 1) == bos


def test_resume_refuses_another_tokenizer_and_takes_the_same_one_moved(trained, tmp_path):
    work, config, path, bos = trained
    if bos:
        pytest.skip("the resume check does not depend on BOS: one case is enough")
    moved = tmp_path / "moved/tokenizer.json"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    shutil.copy(path.parent / "tokenizer_config.json", moved.parent)
    config = config.copy_and_resolve_references()
    config.data.tokenizer = str(moved)
    assert train.Run(config, str(work)).train() == 2  # restored (the same tokenizer), already finished
    config.data.tokenizer = str(make_bpe(tmp_path / "other", bos=bos, vocab=380))
    with pytest.raises(cli.RunError, match="refusing to resume from step 2: data.tokenizer: checkpoint"):
        train.Run(config, str(work))


def test_convert_from_hf_carries_the_tokenizer(tmp_path):
    model = hf_models.hf_model(hf_models.hf_config(family="qwen2", vocab=400, max_pos=128))
    model.save_pretrained(tmp_path / "hf")
    path = make_bpe(tmp_path / "hf", bos=False)
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    carried = tokenizer_lib.load(checkpoint.tokenizer_of(tmp_path / "ckpt"))
    assert carried.fingerprint() == tokenizer_lib.load(path).fingerprint() and carried.bos_id is None
    assert generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "x = 1", "--max-new", "2",
                          "--dtype", "float32"]) == 0
    assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back/tokenizer.json").read_bytes() == path.read_bytes()
    config = tiny_run_config(tmp_path / "spm")  # a fine-tune from it trains with it, none trained
    config.init_from = str(tmp_path / "ckpt")
    assert train.data_config(config).tokenizer == str(checkpoint.tokenizer_of(tmp_path / "ckpt"))
    assert not (tmp_path / "spm").exists()
