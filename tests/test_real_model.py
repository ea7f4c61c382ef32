"""The real-model benchmark (`python -m yarn_jax.bench real-model`): its fixture's GGUF conversion checked
on a hand-made GGUF file (llama.cpp's q/k layout, its tokenizer keys), its verdicts from results, and
parity with transformers on the real SmolLM2 weights at 1k tokens (skipped, saying why, where the
package registries cannot be reached)."""

import json
import math

import numpy as np
import pytest
import torch

from tests.hf_models import hf_config, hf_model
from tests.test_tokenizer import TEXT, make_bpe
from yarn_jax.bench import real_model, real_model_report, smollm2
from yarn_jax.io import tokenizer as tokenizer_lib
from yarn_jax.model import rope as rope_lib

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_restores_rotate_half_attention_scores():
    """The scores q.k that llama.cpp's interleaved rotation gives on its rows equal those transformers'
    rotate-half gives on the un-permuted rows, and unpermute inverts llama.cpp's permutation."""
    rng = np.random.default_rng(0)
    heads, head_dim, d, T = 3, 8, 12, 5
    wq, wk = rng.normal(size=(2, heads * head_dim, d))
    x = rng.normal(size=(T, d))
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    angle = np.arange(T)[:, None] * inv_freq  # [T, H/2]

    def scores(q, k, rotate):  # q, k [T, heads, H]
        q, k = rotate(q), rotate(k)
        return np.einsum("snh,tnh->nst", q, k)

    def interleaved(v):  # llama.cpp: pairs (2i, 2i + 1)
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(v.shape)

    def rotate_half(v):
        cos, sin = rope_lib.cos_sin(np.arange(T)[None], inv_freq.astype(np.float32), 1.0)
        return np.asarray(rope_lib.rotate(v[None].astype(np.float32), cos, sin))[0]

    heads_of = lambda w: (x @ w.T).reshape(T, heads, head_dim)  # noqa: E731
    gguf_q, gguf_k = llama_cpp_permute(wq, heads), llama_cpp_permute(wk, heads)
    np.testing.assert_array_equal(smollm2.unpermute(gguf_q, heads), wq)
    want = scores(heads_of(wq), heads_of(wk), rotate_half)
    np.testing.assert_allclose(scores(heads_of(gguf_q), heads_of(gguf_k), interleaved), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(scores(heads_of(gguf_q), heads_of(gguf_k), rotate_half), want, atol=1e-2)


def write_gguf(path, model, tokenizer_json):
    """A GGUF file of a transformers Llama as llama.cpp writes one: float32 tensors under its names, q/k
    rows permuted, metadata and the byte-level BPE's tokens / merges / types."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    bpe = json.loads(tokenizer_json.read_text())
    tokens = sorted(bpe["model"]["vocab"], key=bpe["model"]["vocab"].get)
    specials = {t["content"] for t in bpe["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    names = {v: k for k, v in smollm2.GGUF_NAMES.items()}
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name.startswith("model.layers."):
            layer, kind = name.split(".")[2], names[".".join(name.split(".")[3:-1])]
            w.add_tensor(f"blk.{layer}.{kind}.weight", llama_cpp_permute(a, heads[kind]) if kind in heads else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_becomes_the_transformers_model_it_came_from(tmp_path):
    bpe = make_bpe(tmp_path / "bpe", bos=False)
    model = hf_model(hf_config(vocab=400, tied=True, max_pos=256))
    write_gguf(tmp_path / "m.gguf", model, bpe)
    smollm2._write_hf(tmp_path / "m.gguf", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["max_position_embeddings"] == 256 and cfg["head_dim"] == 16
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    assert back.config.rms_norm_eps == model.config.rms_norm_eps
    theirs, want = back.state_dict(), model.state_dict()
    assert theirs.keys() == want.keys()
    for name, t in want.items():
        torch.testing.assert_close(theirs[name], t, rtol=0, atol=0, msg=name)
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 400, (1, 40)))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    ours, original = tokenizer_lib.load(tmp_path / "hf"), tokenizer_lib.load(bpe)
    assert ours.encode(TEXT) == original.encode(TEXT) and ours.decode(ours.encode(TEXT)) == TEXT
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (None, 2, 400)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto(TEXT, add_special_tokens=True)["input_ids"] == ours.encode(TEXT)


def _results(changes=None):
    """A results.json with YaRN ahead everywhere; `changes`: {(model, length): perplexity}."""
    changes, label = changes or {}, real_model_report.tuned_label
    o, lengths = 8, [2, 4, 8, 16, 32, 64]
    base = {"RoPE": [9, 8, 7, 30, 90, 200], "PI s=4": [9.5, 8.5, 7.5, 7.6, 7.8, 40],
            "NTK-aware s=4": [9.2, 8.2, 7.2, 7.4, 7.6, 20], "Dynamic NTK": [9, 8, 7, 7.5, 8, 9],
            "YaRN s=4": [9.1, 8.1, 7.1, 7.0, 7.1, 12], "YaRN s=8": [9.2, 8.2, 7.2, 7.1, 7.2, 7.3],
            "Dynamic YaRN": [9, 8, 7, 7.1, 7.3, 7.6]}
    tuned = {"yarn": [6.9, 6.5, 6.3, 8], "pi": [7.0, 6.7, 6.5, 30], "ntk": [7.0, 6.6, 6.4, 15],
             "yarn_short": [7, 6.6, 6.4, 8.1]}
    rows = [{"model": m, "length": n, "perplexity": p} for m, v in base.items()
            for n, p in zip(lengths, v, strict=True)]
    rows += [{"model": label(m), "length": n, "perplexity": p} for m, v in tuned.items()
             for n, p in zip([8, 16, 32, 64], v, strict=True)]
    for r in rows:
        r["perplexity"] = changes.get((r["model"], r["length"]), r["perplexity"])
    pk = {"RoPE": {4: 1.0, 8: 0.95, 16: 0.1, 32: 0.0}, label("yarn"): {8: 1, 16: 0.9, 32: 0.85, 64: 0.2}}
    return {"original": o, "extended": 4 * o, "base_lengths": lengths, "tuned_lengths": [8, 16, 32, 64],
            "perplexity": rows, "passkey_accuracy": pk, "steps_to_target": {"yarn": 20, "pi": 60, "ntk": None},
            "target": 7.0, "parity": [{"relative": 3e-6}]}


def test_the_verdicts_follow_the_numbers():
    held = real_model_report.claims(_results())
    assert held and all(h for h, _ in held.values()), [c for c, (h, _) in held.items() if not h]
    flipped = real_model_report.claims(_results({("Dynamic YaRN", 32): 8.5,
                                                 (real_model_report.tuned_label("pi"), 16): 6.0}))
    failed = {c for c, (h, _) in flipped.items() if not h}
    assert failed == {"Dynamic YaRN beats dynamic NTK past the trained length, without fine-tuning",
                      "Fine-tuned, YaRN has lower perplexity than PI inside the extended window"}


def test_plan_lengths_and_scalings():
    plan = real_model.Plan(8192)
    assert plan.base_lengths == [2048, 4096, 8192, 16384, 32768, 65536] and plan.extended == 32768
    assert plan.base_passkey == [4096, 8192, 16384, 32768] and plan.tuned_lengths == [8192, 16384, 32768, 65536]
    specs = plan.no_finetune()
    assert specs["YaRN s=4"] == "yarn:factor=4,original_max_position_embeddings=8192,max_position_embeddings=32768"
    from yarn_jax.eval.__main__ import _rope
    from yarn_jax.model.config import LlamaConfig, with_rope

    smol = LlamaConfig.from_hf(hf_config(max_pos=8192).to_dict())
    for spec in specs.values():  # each is a valid override of the model's own config
        LlamaConfig.from_hf(with_rope(smol.to_hf(), _rope(spec)))


@pytest.fixture(scope="session")
def smollm2_hf():
    try:
        return smollm2.build(parts=("hf", "novels"))
    except smollm2.FixtureError as e:
        pytest.skip(f"the real-model fixture could not be built: {e}")


def test_parity_with_transformers_on_the_real_weights(smollm2_hf, tmp_path):
    """SmolLM2-135M-Instruct, float32, the first 1024 tokens of Pride and Prejudice: a sane
    perplexity (a wrong q/k order or tokenizer gives hundreds) and ours equal to transformers' for plain RoPE
    and YaRN s=4."""
    plan = real_model.Plan(256, docs=1, parity_lengths=(1024,))  # YaRN s=4 from 256 to 1024
    rows = real_model.parity(tmp_path, smollm2_hf.hf, smollm2_hf.novels, plan, separate_process=False)
    assert {(r["model"], r["length"]) for r in rows} == {("RoPE", 1024), ("YaRN s=4", 1024)}
    for r in rows:
        assert r["relative"] < 1e-4, r
    plain = next(r["yarn_jax"] for r in rows if r["model"] == "RoPE" and r["length"] == 1024)
    assert 10 < plain < 30 and math.isfinite(plain)
