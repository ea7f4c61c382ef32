"""LlamaConfig: every invalid value is a ValueError naming the field; HF dict round trips; presets."""

import jax
import pytest

import yarn_jax
from yarn_jax.model import config as C
from yarn_jax.model import scaling as S

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _with(scaling=None, **kw):
    d = {**BASE, **kw}
    if scaling is not None:
        d["rope_scaling"] = scaling
    return d


# (case, hf dict, field named in the error)
INVALID = [
    ("factor < 1", _with({**YARN, "factor": 0.5}), "rope_scaling.factor"),
    ("linear factor < 1", _with({"rope_type": "linear", "factor": 0.9}), "rope_scaling.factor"),
    ("original <= 0", _with({**YARN, "original_max_position_embeddings": 0}),
     "rope_scaling.original_max_position_embeddings"),
    ("original not an integer", _with({**YARN, "original_max_position_embeddings": 64.5}),
     "rope_scaling.original_max_position_embeddings"),
    ("beta_fast <= beta_slow", _with({**YARN, "beta_fast": 1.0, "beta_slow": 2.0}), "rope_scaling.beta_fast"),
    ("attention_factor <= 0", _with({**YARN, "attention_factor": 0.0}), "rope_scaling.attention_factor"),
    ("odd head_dim", _with(head_dim=15), "head_dim"),
    ("heads not divisible by kv heads", _with(num_key_value_heads=3), "num_key_value_heads"),
    ("hidden != heads * head_dim", _with(hidden_size=66), "hidden_size"),
    ("unknown rope type", _with({"rope_type": "ntk-by-magic", "factor": 2.0}), "rope_scaling.rope_type"),
    ("non-numeric factor", _with({**YARN, "factor": "16"}), "rope_scaling.factor"),
    ("non-numeric theta", _with(rope_theta="1e4"), "rope_theta"),
    ("non-numeric layers", _with(num_hidden_layers=None), "num_layers"),
    ("dynamic yarn beta", _with({"rope_type": "dynamic_yarn", "beta_fast": 1, "beta_slow": 1}),
     "rope_scaling.beta_fast"),
    ("longrope wrong length", _with({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
     "rope_scaling.short_factor"),
    ("not llama", _with(model_type="gpt2"), "model_type"),
    ("truncate not bool", _with({**YARN, "truncate": "no"}), "rope_scaling.truncate"),
]


@pytest.mark.parametrize("case,hf,field", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_names_the_field(case, hf, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        C.LlamaConfig.from_hf(hf)


def test_unrecognised_rope_keys_warn_with_their_names():
    with pytest.warns(UserWarning, match=r"\['low_freq_factor', 'wibble'\]"):
        C.LlamaConfig.from_hf(_with({**YARN, "wibble": 1, "low_freq_factor": 1.0}))


@pytest.mark.parametrize("scaling", [None, YARN, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "dynamic_yarn", "original_max_position_embeddings": 64,
                                      "finetuned": True},
                                     {"rope_type": "ntk", "alpha": 4.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_round_trip(scaling, tied):
    cfg = C.LlamaConfig.from_hf(_with(scaling, tie_word_embeddings=tied))
    again = C.LlamaConfig.from_hf(cfg.to_hf())
    assert again == cfg
    assert cfg.tie_word_embeddings is tied


def test_rope_parameters_of_transformers_5_are_read():
    d = {**BASE, "rope_parameters": {**YARN, "rope_theta": 500000.0}}
    del d["rope_theta"]
    cfg = C.LlamaConfig.from_hf(d)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == S.Yarn(4.0, 64)
    old_style = C.LlamaConfig.from_hf(_with({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                            rope_theta=500000.0))
    assert old_style == cfg


def test_explicit_head_dim_and_gqa():
    cfg = C.LlamaConfig.from_hf(_with(head_dim=32, hidden_size=96))
    assert (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (32, 4, 2, 96)


@pytest.mark.parametrize("name,count", [("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320),
                                        ("llama2_70b", 68_976_648_192), ("llama3_8b", 8_030_261_248)])
def test_presets_have_the_real_parameter_counts(name, count):
    cfg = C.PRESETS[name]()
    shapes = jax.eval_shape(lambda: yarn_jax.init_params(cfg, jax.random.key(0)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == count == cfg.num_params()
