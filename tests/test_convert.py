"""HF <-> Orbax conversion: bit-identical round trips, logits parity, clear errors with nothing written."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

import yarn_jax
from tests import hf_models
from tests.tolerances import EXPORTED_LOGITS_ATOL, HF_LOGITS_ATOL
from yarn_jax import convert
from yarn_jax.io import checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
VARIANTS = {
    "mha": dict(heads=4, kv_heads=4),
    "gqa": dict(heads=4, kv_heads=2, rope_scaling=YARN),
    "tied": dict(heads=4, kv_heads=1, tied=True, rope_scaling=YARN),
    "head_dim": dict(heads=4, kv_heads=2, head_dim=32, hidden=48),
}


def _save(model, path, *, dtype=torch.float32, shard=None, bin_=False):
    model.to(dtype).save_pretrained(path, safe_serialization=not bin_, max_shard_size=shard or "10GB")
    return path


def _torch_state(path):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype="auto")
    return {k: v.detach().view(torch.int16 if v.dtype == torch.bfloat16 else v.dtype).numpy()
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, variant, layout, dtype):
    if layout == "bin" and variant in ("tied", "head_dim"):
        pytest.skip("one .bin case per dtype is enough")
    model = hf_models.hf_model(hf_models.hf_config(**VARIANTS[variant]))
    src = _save(model, tmp_path / "hf", dtype=dtype, shard="40KB" if layout == "sharded" else None,
                bin_=layout == "bin")
    if layout == "sharded":
        assert (src / "model.safetensors.index.json").exists()
    convert.from_hf(src, tmp_path / "ckpt")
    convert.to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="30KB")
    a, b = _torch_state(src), _torch_state(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    if variant == "tied":
        assert "lm_head.weight" not in json.loads((tmp_path / "back/model.safetensors.index.json").read_text())[
            "weight_map"]


def test_yarn_logits_match_after_conversion_and_export(tmp_path):
    model = hf_models.hf_model(hf_models.hf_config(rope_scaling=YARN, max_pos=128))
    src = _save(model, tmp_path / "hf")
    convert.from_hf(src, tmp_path / "ckpt")
    cfg, params = checkpoint.load_checkpoint(tmp_path / "ckpt", dtype="float32")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 100))  # past original (32)
    want = hf_models.hf_logits(model, tokens)
    np.testing.assert_allclose(yarn_jax.forward(cfg, params, tokens), want, atol=HF_LOGITS_ATOL, rtol=0)
    convert.to_hf(tmp_path / "ckpt", tmp_path / "out", tokenizer=None)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.rope_parameters["rope_type"] == "yarn"
    np.testing.assert_allclose(hf_models.hf_logits(again, tokens), want, atol=EXPORTED_LOGITS_ATOL, rtol=0)


def test_rope_override_extends_a_model(tmp_path):
    model = hf_models.hf_model(hf_models.hf_config(max_pos=32))
    src = _save(model, tmp_path / "hf")
    cfg = convert.from_hf(src, tmp_path / "ckpt", dtype="bfloat16",
                          rope={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32,
                                "max_position_embeddings": 512})
    assert cfg.rope_scaling == yarn_jax.model.scaling.Yarn(16.0, 32) and cfg.max_position_embeddings == 512
    cfg2, params = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert cfg2.rope_scaling == cfg.rope_scaling
    assert params["embedding"].dtype == jax.numpy.bfloat16
    convert.to_hf(tmp_path / "ckpt", tmp_path / "out")
    hf = json.loads((tmp_path / "out/config.json").read_text())
    assert hf["rope_scaling"]["factor"] == 16.0 and hf["max_position_embeddings"] == 512


def test_scalings_transformers_lacks_are_refused_on_export():
    """PI with a temperature (the ablation's) and dynamic YaRN have no transformers form: exporting one
    would give a model that loads and computes something else."""
    base = yarn_jax.model.config.tiny(max_position_embeddings=32).to_hf()
    for scaling, field in (({"rope_type": "linear", "factor": 4.0, "attention_factor": 1.2}, "attention_factor"),
                           ({"rope_type": "dynamic_yarn", "original_max_position_embeddings": 32}, "dynamic_yarn")):
        cfg = yarn_jax.model.config.LlamaConfig.from_hf({**base, "rope_scaling": scaling})
        with pytest.raises(ValueError, match=field):
            convert.transformers_config(cfg)
    plain_pi = yarn_jax.model.config.LlamaConfig.from_hf({**base,
                                                         "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    assert convert.transformers_config(plain_pi)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_cli_both_ways(tmp_path):
    from tests.test_tokenizer import make_bpe

    model = hf_models.hf_model(hf_models.hf_config(vocab=400))
    src = _save(model, tmp_path / "hf")
    tok = make_bpe(tmp_path / "tok", bos=True)
    assert convert.main(["from-hf", str(src), str(tmp_path / "ckpt"), "--rope-type", "yarn", "--factor", "4",
                         "--original-max-position-embeddings", "64", "--max-position-embeddings", "256"]) == 0
    assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "bfloat16",
                         "--tokenizer", str(tok.parent)]) == 0
    assert (tmp_path / "out/tokenizer.json").read_bytes() == tok.read_bytes()
    assert json.loads((tmp_path / "out/config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out/generation_config.json").read_text())["eos_token_id"] == 2
    assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2  # exists
    assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--overwrite"]) == 0


def _tree(root):
    """Every file under `root` with its bytes (hidden files included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["to-hf-onto-ckpt", "from-hf-onto-hf", "to-hf-onto-run", "to-hf-into-ckpt",
                                  "onto-foreign-dir"])
def test_overwrite_never_destroys_an_input_or_a_foreign_directory(tmp_path, capsys, case):
    """The three data-loss cases of a new user's run (and their mirror images): refused before anything
    is written, whatever --overwrite says; every input byte-for-byte intact."""
    src = _hf_dir(tmp_path)
    run = tmp_path / "run"
    convert.from_hf(src, run / "checkpoints")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    argv, message = {
        "to-hf-onto-ckpt": (["to-hf", run / "checkpoints", run / "checkpoints"], "is the input"),
        "from-hf-onto-hf": (["from-hf", src, src], "is the input"),
        "to-hf-onto-run": (["to-hf", run / "checkpoints", run], "contains the input"),
        "to-hf-into-ckpt": (["to-hf", run / "checkpoints", run / "checkpoints/export"], "lies inside the input"),
        "onto-foreign-dir": (["to-hf", run / "checkpoints", foreign], "replaces only a directory written by"),
    }[case]
    before = _tree(tmp_path)
    capsys.readouterr()
    assert convert.main([str(a) for a in argv] + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert _tree(tmp_path) == before


def test_sigterm_during_a_conversion_leaves_nothing_behind(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = _save(hf_models.hf_model(hf_models.hf_config(layers=2)), tmp_path / "hf")
    code = ("import os, signal, sys; from yarn_jax import convert; from yarn_jax.io import checkpoint\n"
            "real = checkpoint.save_params_streamed\n"
            "def slow(*a, **k):\n"
            "    real(*a, **k); print('written', flush=True); signal.pause()\n"
            "checkpoint.save_params_streamed = slow\n"
            f"sys.exit(convert.main(['from-hf', {str(src)!r}, {str(tmp_path / 'ckpt')!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "written"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "error: stopped by SIGTERM", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no hidden temporary


# ----------------------------------------------------------------------------- bad input


def _hf_dir(tmp_path, **kw):
    return _save(hf_models.hf_model(hf_models.hf_config(**kw)), tmp_path / "hf", shard="40KB")


def _break_missing_shard(d):
    next(d.glob("model-00002-*.safetensors")).unlink()
    return "is missing"


def _break_index(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(f for f in set(idx["weight_map"].values()) if f != idx["weight_map"][name])
    idx["weight_map"][name] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "does not contain it"


def _break_header(d):
    f = next(d.glob("model-00001-*.safetensors"))
    f.write_bytes(f.read_bytes()[:20])
    return "truncated safetensors header"


def _break_missing_tensor(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.1.self_attn.v_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return r"missing tensors \['model.layers.1.self_attn.v_proj.weight'\]"


def _break_lm_head(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["lm_head.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "lm_head.weight is missing while tie_word_embeddings is false"


def _break_kv_rows(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the file's k/v have 2 * 16 rows
    (d / "config.json").write_text(json.dumps(cfg))
    return r"k_proj.weight: expected shape \(64, 64\)"


def _break_unexpected(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    return "unexpected tensors"


def _break_arch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (d / "config.json").write_text(json.dumps(cfg))
    return "model_type: expected"


BROKEN = [_break_missing_shard, _break_index, _break_header, _break_missing_tensor, _break_lm_head, _break_kv_rows,
          _break_unexpected, _break_arch]


@pytest.mark.parametrize("breaker", BROKEN, ids=lambda f: f.__name__[7:])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, breaker):
    d = _hf_dir(tmp_path)
    message = breaker(d)
    before = {p: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ValueError, match=message):
        convert.from_hf(d, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left behind
    assert {p: p.read_bytes() for p in d.iterdir()} == before  # input untouched


def test_unknown_dtype_and_existing_output(tmp_path):
    d = _hf_dir(tmp_path)
    with pytest.raises(ValueError, match="--dtype: expected one of"):
        convert.from_hf(d, tmp_path / "ckpt", dtype="float8")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="output directory exists"):
        convert.from_hf(d, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="replaces only a directory written by yarn_jax.convert"):
        convert.from_hf(d, tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt/keep.txt").read_text() == "mine"


def test_failure_while_writing_leaves_previous_output(tmp_path, monkeypatch):
    d = _hf_dir(tmp_path)
    convert.from_hf(d, tmp_path / "ckpt")
    convert.to_hf(tmp_path / "ckpt", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(convert.hf_files, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        convert.to_hf(tmp_path / "ckpt", tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf", "out"]
    shutil.rmtree(tmp_path / "out")


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    import errno

    d = _hf_dir(tmp_path)
    convert.from_hf(d, tmp_path / "ckpt")
    convert.to_hf(tmp_path / "ckpt", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(convert.hf_files, "write_safetensors", full)
    assert convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--overwrite"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no space left on device" in errors[0], err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_stale_temporaries_of_a_killed_conversion_are_removed_and_outputs_follow_the_umask(tmp_path):
    d = _hf_dir(tmp_path)
    dead = tmp_path / ".ckpt.tmp-999999999-abc"  # no such process: left by a conversion killed with -9
    dead.mkdir()
    (dead / "shard").write_bytes(b"x" * 1000)
    alive = tmp_path / f".ckpt.tmp-{os.getpid()}-xyz"  # a conversion still running: left alone
    alive.mkdir()
    old_umask = os.umask(0o022)
    try:
        convert.from_hf(d, tmp_path / "ckpt")
    finally:
        os.umask(old_umask)
    assert not dead.exists() and alive.exists()
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
