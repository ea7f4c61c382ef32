"""Every shipped config loads, validates and describes the model it claims."""

import pytest

from tests.train_helpers import ROOT, load_config
from yarn_jax.model import config as config_lib
from yarn_jax.model import scaling
from yarn_jax.run_config import model_config

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_a_valid_model(name):
    c = load_config(name)
    cfg, init_from = model_config(c)
    assert init_from is None
    assert c.data.seq_len <= cfg.max_position_embeddings
    if c.mesh.seq > 1:
        assert c.data.seq_len % (2 * c.mesh.seq) == 0
    assert c.data.batch_size % c.train.grad_accum == 0


def test_paper_recipe():
    c64, c128 = load_config("v4_64k"), load_config("v4_128k")
    cfg64, _ = model_config(c64)
    assert cfg64.num_params() == config_lib.llama2_7b().num_params()
    assert cfg64.rope_scaling == scaling.Yarn(16.0, 4096) and cfg64.max_position_embeddings == 65536
    assert (c64.optim.lr, c64.optim.warmup_steps, c64.optim.b1, c64.optim.b2, c64.optim.weight_decay) == (
        2e-5, 20, 0.9, 0.95, 0.0)
    assert (c64.train.steps, c64.data.batch_size, c128.train.steps, c128.data.seq_len) == (400, 64, 200, 131072)
    assert model_config(c128)[0].rope_scaling.factor == 32.0


def test_rope_overrides_follow_one_rule_in_train_convert_and_eval():
    """A `rope` naming rope_type replaces the model's scaling; one without it updates the scaling; the
    lengths and base are top-level keys. train (run config), convert and eval apply the same function."""
    import inspect

    from yarn_jax import convert
    from yarn_jax.eval import __main__ as eval_main

    c = load_config("v4_64k")
    yarn_hf = model_config(c)[0].to_hf()  # a model extended with YaRN (s 16, original 4096)
    updated = config_lib.LlamaConfig.from_hf(config_lib.with_rope(yarn_hf, {"factor": 8.0}))
    assert updated.rope_scaling == scaling.Yarn(8.0, 4096)  # no rope_type: the other settings stay
    c.rope = {"rope_type": "linear", "factor": 2.0, "max_position_embeddings": 8192}
    cfg, _ = model_config(c)
    assert cfg.rope_scaling == scaling.Linear(2.0) and cfg.max_position_embeddings == 8192
    assert convert.with_rope is config_lib.with_rope and "with_rope(cfg.to_hf(), rope)" in inspect.getsource(eval_main)
