"""RoPE frequencies against transformers' ROPE_INIT_FUNCTIONS and the frozen original-code reference;
angles against float64; application against transformers' apply_rotary_pos_emb."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from tests.reference import original_yarn as ref
from tests.tolerances import ANGLE_ATOL, FLOAT64_ATOL, ROPE_RTOL
from yarn_jax.model import rope as R
from yarn_jax.model import scaling as S


def _hf(head_dim, theta, max_pos, scaling):
    return transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                    rope_theta=theta, max_position_embeddings=max_pos, rope_scaling=scaling)


def _ours(head_dim, theta, max_pos, scaling, seq_len=None):
    rope = R.Rope(head_dim, theta, max_pos, S.scaling_from_dict(dict(scaling) if scaling else None, max_pos))
    return R.frequencies(rope, seq_len)


def _check_hf(head_dim, theta, max_pos, scaling, seq_len=None):
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](_hf(head_dim, theta, max_pos, dict(scaling)),
                                                                   "cpu", seq_len=seq_len)
    inv, factor = _ours(head_dim, theta, max_pos, scaling, seq_len)
    assert inv.dtype == np.float32 and inv.shape == (head_dim // 2,)
    # transformers blends with a float32 ramp in [0, 1]; its rounding (2 ulps of the ramp) times theta_i is
    # allowed on top of rtol, since we evaluate in float64
    ramp_rounding = 2.0**-23 * R.frequencies(R.Rope(head_dim, theta, max_pos))[0]
    np.testing.assert_array_less(np.abs(inv - hf_inv.numpy()), ROPE_RTOL * np.abs(hf_inv.numpy()) + ramp_rounding)
    np.testing.assert_allclose(factor, hf_factor, rtol=ROPE_RTOL)


GRID = list(itertools.product([2, 4, 8, 16, 32, 64], [64, 128], [1e4, 5e5]))


@pytest.mark.parametrize("factor,head_dim,theta", GRID)
def test_linear_and_yarn_defaults_match_transformers(factor, head_dim, theta):
    _check_hf(head_dim, theta, 4096 * factor, {"rope_type": "linear", "factor": float(factor)})
    _check_hf(head_dim, theta, 4096 * factor,
              {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": 4096})


YARN_VARIANTS = [
    {"beta_fast": 16.0, "beta_slow": 2.0},
    {"beta_fast": 64.0, "beta_slow": 0.5},
    {"mscale": 1.0, "mscale_all_dim": 0.5},
    {"mscale": 0.707, "mscale_all_dim": 0.707},
    {"attention_factor": 1.3},
    {"truncate": False},
    {"truncate": False, "beta_fast": 24.0, "attention_factor": 0.9},
]


@pytest.mark.parametrize("variant", YARN_VARIANTS, ids=lambda v: ",".join(v))
@pytest.mark.parametrize("factor,head_dim,theta", [(4, 64, 1e4), (16, 128, 1e4), (40, 128, 5e5)])
def test_yarn_variants_match_transformers(variant, factor, head_dim, theta):
    scaling = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": 4096, **variant}
    _check_hf(head_dim, theta, 4096 * factor, scaling)
    # factor not equal to max / original (HF before #40320 silently replaced it), and Qwen-style max == original
    _check_hf(head_dim, theta, 4096 * 2, scaling)
    _check_hf(head_dim, theta, 4096, scaling)


def test_yarn_without_factor_uses_max_over_original():
    implicit = _ours(128, 1e4, 32768, {"rope_type": "yarn", "original_max_position_embeddings": 4096})
    explicit = _ours(128, 1e4, 32768, {"rope_type": "yarn", "original_max_position_embeddings": 4096, "factor": 8.0})
    np.testing.assert_array_equal(implicit[0], explicit[0])
    assert implicit[1] == explicit[1] == pytest.approx(0.1 * math.log(8) + 1)


@pytest.mark.parametrize("seq_len", [None, 100, 4096, 4097, 10000, 65536, 131072])
@pytest.mark.parametrize("factor,head_dim,theta", [(2, 64, 1e4), (8, 128, 5e5), (32, 128, 1e4)])
def test_dynamic_ntk_matches_transformers(seq_len, factor, head_dim, theta):
    _check_hf(head_dim, theta, 4096, {"rope_type": "dynamic", "factor": float(factor)}, seq_len)


@pytest.mark.parametrize("factor,low,high,orig", [(8, 1, 4, 8192), (32, 1, 4, 8192), (4, 2, 8, 4096)])
@pytest.mark.parametrize("head_dim,theta", [(64, 1e4), (128, 5e5)])
def test_llama3_matches_transformers(factor, low, high, orig, head_dim, theta):
    _check_hf(head_dim, theta, orig * factor, {"rope_type": "llama3", "factor": float(factor),
                                               "low_freq_factor": float(low), "high_freq_factor": float(high),
                                               "original_max_position_embeddings": orig})


@pytest.mark.parametrize("seq_len", [None, 1000, 4096, 5000])
@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.2}, {"factor": 8.0}])
def test_longrope_matches_transformers(seq_len, extra):
    rng = np.random.default_rng(0)
    scaling = {"rope_type": "longrope", "short_factor": list(rng.uniform(1, 2, 32)),
               "long_factor": list(rng.uniform(1, 20, 32)), "original_max_position_embeddings": 4096, **extra}
    _check_hf(64, 1e4, 131072, scaling, seq_len)


def test_default_matches_transformers():
    for head_dim, theta in [(64, 1e4), (128, 5e5), (96, 1e6)]:
        hf_inv, _ = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(_hf(head_dim, theta, 4096,
                                                                                           None))
        inv, factor = _ours(head_dim, theta, 4096, None)
        np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=ROPE_RTOL)
        assert factor == 1.0


# ----------------------------------------------------------------------------- original code


@pytest.mark.parametrize("alpha,head_dim,theta", [(2, 64, 1e4), (8, 128, 1e4), (16, 128, 5e5)])
def test_ntk_matches_original_formula(alpha, head_dim, theta):
    inv, factor = _ours(head_dim, theta, 4096, {"rope_type": "ntk", "alpha": float(alpha)})
    np.testing.assert_allclose(inv, ref.ntk(head_dim, theta, alpha), rtol=ROPE_RTOL)
    assert factor == 1.0


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("orig,head_dim,theta,betas", [(4096, 128, 1e4, (32, 1)), (2048, 64, 1e4, (16, 2)),
                                                       (8192, 128, 5e5, (32, 1)), (512, 64, 1e4, (32, 1))])
def test_yarn_ramp_matches_original_formula(truncate, orig, head_dim, theta, betas):
    ours = S.yarn_ramp(head_dim, theta, orig, *betas, truncate)
    np.testing.assert_allclose(ours, ref.ramp(head_dim, theta, orig, *betas, truncate), rtol=0, atol=FLOAT64_ATOL)
    assert 0.0 < ours.mean() < 1.0  # some dimensions kept, some interpolated at these settings


@pytest.mark.parametrize("finetuned", [False, True])
@pytest.mark.parametrize("seq_len", [None, 1000, 4096, 8192, 8193, 20000, 131072])
def test_dynamic_yarn_matches_original_formula(finetuned, seq_len):
    orig, max_pos, head_dim, theta = 4096, 8192, 128, 1e4
    scaling = {"rope_type": "dynamic_yarn", "original_max_position_embeddings": orig, "finetuned": finetuned}
    inv, factor = _ours(head_dim, theta, max_pos, scaling, seq_len)
    want_inv, want_factor = ref.dynamic_yarn(head_dim, theta, orig, max_pos, seq_len or 0, finetuned)
    np.testing.assert_allclose(inv, want_inv, rtol=ROPE_RTOL)
    np.testing.assert_allclose(factor, want_factor, rtol=ROPE_RTOL)


def test_yarn_equals_finetuned_dynamic_yarn_at_its_own_scale():
    yarn = R.frequencies(R.Rope(128, 1e4, 65536, S.Yarn(16.0, 4096)), dtype=np.float64)
    dyn = R.frequencies(R.Rope(128, 1e4, 65536, S.DynamicYarn(4096, finetuned=True)), 1000, dtype=np.float64)
    np.testing.assert_allclose(yarn[0], dyn[0], rtol=0, atol=FLOAT64_ATOL)
    assert yarn[1] == pytest.approx(0.1 * math.log(16) + 1) == dyn[1]


# ----------------------------------------------------------------------------- angles and application


@pytest.mark.parametrize("scaling", [S.Default(), S.Yarn(32.0, 4096), S.Linear(4.0)])
def test_cos_sin_exact_to_131072_against_float64(scaling):
    rope = R.Rope(128, 1e4, 4096 * 32, scaling)
    inv, factor = R.frequencies(rope, dtype=np.float64)
    positions = np.concatenate([np.arange(0, 131073, 97), np.arange(131000, 131073)])
    cos, sin = jax.jit(lambda p: R.cos_sin(p, inv, factor))(jnp.asarray(positions)[None])
    angles = positions[:, None].astype(np.float64) * inv[None]
    np.testing.assert_allclose(np.asarray(cos[0]), np.cos(angles) * factor, atol=ANGLE_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(sin[0]), np.sin(angles) * factor, atol=ANGLE_ATOL, rtol=0)
    # the naive float32 product is far off there: this test would catch a regression to it
    naive = np.cos(positions[:, None].astype(np.float32) * inv.astype(np.float32)[None])
    assert np.abs(naive - np.cos(angles)).max() > 100 * ANGLE_ATOL


def test_apply_rope_matches_transformers():
    rng = np.random.default_rng(1)
    b, t, n, h = 2, 50, 3, 32
    x = rng.normal(size=(b, t, n, h)).astype(np.float32)
    positions = rng.integers(0, 5000, size=(b, t))
    rope = R.Rope(h, 1e4, 4096, S.Yarn(8.0, 512))
    inv, factor = R.frequencies(rope)
    ours = R.apply_rope(jnp.asarray(x), jnp.asarray(positions), inv, factor)
    freqs = positions[..., None].astype(np.float64) * inv.astype(np.float64)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = torch.tensor(np.cos(emb) * factor), torch.tensor(np.sin(emb) * factor)
    xt = torch.tensor(x.astype(np.float64)).transpose(1, 2)  # HF: [B, N, T, H]
    want, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, cos, sin)
    np.testing.assert_allclose(np.asarray(ours), want.transpose(1, 2).numpy(), atol=ANGLE_ATOL)
