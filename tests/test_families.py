"""The LLaMA family's switches (Mistral's window, Qwen2's biases, Qwen3's per-head q/k norm and head_dim)
against tiny random `transformers` models of each class, with YaRN, past original_max_position_embeddings:
logits, bit-exact round trips, the export's class, cached generation, sharded forward and gradients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import yarn_jax
from tests import hf_models
from tests.test_generate import _recomputed
from tests.test_sharding import assert_sharded_equals_one_device
from tests.tolerances import (
    EXPORTED_LOGITS_ATOL,
    HF_LOGITS_RTOL,
    REORDER_ATOL,
    REORDER_RTOL,
)
from yarn_jax import convert, sharding
from yarn_jax.attention import cudnn, reference
from yarn_jax.io import checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
T = 40  # tokens: past original_max_position_embeddings (16) and past the windows (8)
VARIANTS = {
    "llama-bias": dict(family="llama", attention_bias=True),
    "mistral": dict(family="mistral"),
    "mistral-window": dict(family="mistral", sliding_window=8),
    "qwen2": dict(family="qwen2"),
    "qwen2-window": dict(family="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0),
    "qwen3": dict(family="qwen3", head_dim=24, hidden=64),  # head_dim != hidden / heads
    "qwen3-bias": dict(family="qwen3", attention_bias=True),  # q, k, v and o biases
}
WINDOWED = ("mistral-window", "qwen2-window")


def _model(variant):
    return hf_models.hf_model(hf_models.hf_config(rope_scaling=YARN, **VARIANTS[variant]))


def _tokens(cfg, b=2, t=T, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers(variant):
    model = _model(variant)
    cfg, params = hf_models.ours(model)
    assert cfg.family.value == VARIANTS[variant]["family"]
    tokens = _tokens(cfg)
    want = hf_models.hf_logits(model, tokens)
    got = np.asarray(yarn_jax.forward(cfg, params, tokens))
    np.testing.assert_allclose(got, want, rtol=0, atol=HF_LOGITS_RTOL * np.abs(want).max())
    if variant in WINDOWED:  # the window changes the logits past it: a test that could not pass without it
        plain = cfg.replace(sliding_window=None)
        assert np.abs(np.asarray(yarn_jax.forward(plain, params, tokens)) - want)[:, 8:].max() > 1e-3


@pytest.mark.parametrize("variant", ["llama-bias", "mistral", "mistral-window", "qwen2-window", "qwen3"])
def test_round_trip_is_bit_identical_and_exports_as_the_same_class(tmp_path, variant):
    model = _model(variant)
    model.save_pretrained(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "ckpt")
    convert.to_hf(tmp_path / "ckpt", tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(model)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same RoPE settings (ours also spell out the defaults: beta_fast, beta_slow, truncate)
    assert model.config.rope_parameters.items() <= again.config.rope_parameters.items()
    for key in ("sliding_window", "head_dim", "layer_types", "attention_bias", "use_sliding_window"):
        assert getattr(again.config, key, None) == getattr(model.config, key, None), key
    tokens = _tokens(model.config)
    np.testing.assert_allclose(hf_models.hf_logits(again, tokens), hf_models.hf_logits(model, tokens),
                               rtol=0, atol=EXPORTED_LOGITS_ATOL)
    stored = json.loads((tmp_path / "out/config.json").read_text())
    assert stored["model_type"] == model.config.model_type


@pytest.mark.parametrize("variant", ["mistral-window", "qwen3-bias"])  # the window; the biases and q/k norms
def test_cached_generation_equals_recomputation(variant):
    cfg, params = hf_models.ours(_model(variant))
    params = jax.tree.map(lambda x: x * 3, params)  # sharper logits
    prompt = _tokens(cfg, t=12)
    got = yarn_jax.generate.generate(cfg, params, prompt, 14)  # 12 -> 26 tokens: past the window and 16
    np.testing.assert_array_equal(got, _recomputed(cfg, params, prompt, 14, lambda n: n))


MESHES = [dict(data=2, fsdp=2, tensor=2), dict(fsdp=2, seq=2, tensor=2)]
SHARDED = {"mistral-window": dict(family="mistral", sliding_window=8),  # every switch in two models
           "qwen3": dict(family="qwen3", head_dim=24, hidden=64, attention_bias=True)}


@pytest.mark.parametrize("variant,mesh_shape", [("mistral-window", MESHES[0]), ("mistral-window", MESHES[1]),
                                                ("qwen3", MESHES[1])],
                         ids=["mistral-window-data,fsdp,tensor", "mistral-window-ring", "qwen3-fsdp,seq,tensor"])
def test_sharded_logits_and_grads_equal_one_device(variant, mesh_shape):
    cfg, params = hf_models.ours(hf_models.hf_model(hf_models.hf_config(rope_scaling=YARN, **SHARDED[variant])))
    tokens = jnp.asarray(_tokens(cfg, b=4, t=32))
    mesh = sharding.make_mesh(**mesh_shape)
    assert_sharded_equals_one_device(cfg, params, mesh, tokens)


def test_window_mask_and_the_fused_kernel_arguments():
    """The reference's window against a brute-force mask; cuDNN's local-window arguments (run by jax's
    portable implementation, the same contract) against the reference, forward and gradients."""
    rng = np.random.default_rng(3)
    b, t, n, k, h = 2, 24, 4, 2, 8
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h)))
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    for window in (1, 5, 100):  # 100 > t: plain causal
        want_mask = (j <= i) & (i - j < window)
        np.testing.assert_array_equal(reference.mask(None, None, idx, idx, window)[0], want_mask)
        ref = lambda q, kk, v, w=window: reference.attention(q, kk, v, None, None, idx, idx, window=w)  # noqa: E731
        fused = lambda q, kk, v, w=window: cudnn.attention(q, kk, v, None, None, idx, idx, window=w,  # noqa: E731
                                                           implementation="xla")
        (got, got_vjp), (want, want_vjp) = jax.vjp(fused, q, kk, v), jax.vjp(ref, q, kk, v)
        np.testing.assert_allclose(got, want, rtol=REORDER_RTOL, atol=REORDER_ATOL)
        for a, b_ in zip(got_vjp(q), want_vjp(q), strict=True):
            np.testing.assert_allclose(a, b_, rtol=REORDER_RTOL, atol=REORDER_ATOL)


BAD = [
    ({"model_type": "mixtral"}, "model_type: expected one of \\['llama', 'mistral', 'qwen2', 'qwen3'\\]"),
    ({"attention_bias": "yes"}, "attention_bias: expected true or false"),
    ({"model_type": "mistral", "sliding_window": "4096"}, "sliding_window: expected a number"),
    ({"model_type": "qwen2", "use_sliding_window": 1}, "use_sliding_window: expected true or false"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "layer_types: a sliding window on some layers only \\(1 of 2\\)"),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8, "layer_types": ["full", "x"]},
     "layer_types: expected a list of"),
    ({"mlp_bias": True}, "mlp_bias: MLP biases are not part"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_family_keys_name_the_key(change, message):
    hf = {**yarn_jax.model.config.tiny().to_hf(), **change}
    with pytest.raises(ValueError, match=message):
        yarn_jax.LlamaConfig.from_hf(hf)


def test_from_hf_on_a_family_directory_needs_no_flags(tmp_path, capsys):
    """`convert from-hf` on a Qwen3 directory (the command line a user runs), YaRN added by flags."""
    _model("qwen3").save_pretrained(tmp_path / "hf")
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--rope-type", "yarn",
                         "--factor", "4", "--original-max-position-embeddings", "64",
                         "--max-position-embeddings", "256"]) == 0
    cfg = checkpoint.Reader(tmp_path / "ckpt").cfg
    assert cfg.family.value == "qwen3" and cfg.qk_norm and cfg.head_dim == 24 and cfg.max_position_embeddings == 256
