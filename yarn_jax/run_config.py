"""The run configuration's keys and defaults (an ml_collections.ConfigDict); configs/*.py start from
`base()` and change what their run needs. Defaults are the paper's fine-tuning recipe (section 4)."""

import ast
import dataclasses
import re
from pathlib import Path

import ml_collections
from ml_collections.config_dict import placeholder

from yarn_jax import sharding
from yarn_jax.io import checkpoint
from yarn_jax.model import config as config_lib
from yarn_jax.model.execution import Execution

SHAPE_KEYS = {"vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_layers": int, "num_heads": int,
              "num_kv_heads": int, "head_dim": int, "max_position_embeddings": int, "rope_theta": float,
              "rms_norm_eps": float, "tie_word_embeddings": bool}
EXECUTION_KEYS = tuple(f.name for f in dataclasses.fields(Execution))  # model.* keys that fill `Execution`


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a `convert from-hf` checkpoint (or a trainer's); empty: random init from `model`
    c.model = ml_collections.ConfigDict(dict(
        preset="llama2_7b",  # shape when not initialising from a checkpoint; the shape keys below override it
        dtype="bfloat16", param_dtype="float32", remat="full", attention="auto", ring_layout="zigzag", scan_unroll=1,
        fp8=False,
        **{key: placeholder(kind) for key, kind in SHAPE_KEYS.items()}))  # unset: the preset's value
    # the extension: the scaling (rope_type, factor, original_max_position_embeddings, ...: see
    # config.with_rope) and the extended max_position_embeddings, the one home of the extended length;
    # model.max_position_embeddings is the preset's trained length (ignored with init_from)
    c.rope = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        sources=(),  # files or globs; empty: the Python standard library's *.py files
        format="text", field="text", tokenizer="", tokenizer_vocab=32000, cache_dir="~/.cache/yarn_jax",
        seq_len=65536, batch_size=64, positions="chunk", packing="concat", seed=0, shuffle=True, skip_docs=0))
    c.optim = ml_collections.ConfigDict(dict(lr=2e-5, warmup_steps=20, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                                             clip=1.0, schedule="constant"))
    c.train = ml_collections.ConfigDict(dict(steps=400, grad_accum=1, loss_chunk=2048, save_every=50, keep=3,
                                             inject_nan_at=-1))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, seq=1, tensor=1))
    return c


def execution(config: ml_collections.ConfigDict) -> Execution:
    """How the run's model executes: model.dtype, model.remat, ... (EXECUTION_KEYS)."""
    return Execution(**{k: config.model[k] for k in EXECUTION_KEYS})


def model_config(config: ml_collections.ConfigDict) -> tuple[config_lib.LlamaConfig, str | None]:
    """(LlamaConfig, checkpoint to initialise from or None) from the run config: the architecture from
    `init_from` or `model.preset` and the shape keys, RoPE from `rope`, the execution from model.dtype etc."""
    shape = {k: v for k, v in config.model.items() if k in SHAPE_KEYS and v is not None}
    if config.init_from:
        held = checkpoint.Reader(config.init_from).cfg
        # the checkpoint decides the shape; a shape key set to another value is a mistake, never ignored
        # (max_position_embeddings excepted: the preset's trained length, the extension lives in `rope`)
        for key, value in shape.items():
            if key != "max_position_embeddings" and getattr(held, key) != value:
                raise ValueError(f"model.{key}: {value!r} in the run config, but init_from {config.init_from} holds "
                                 f"{getattr(held, key)!r}; unset the model's shape keys (the "
                                 "checkpoint decides the shape) or start from another checkpoint")
        base = held.to_hf()
    else:
        base = config_lib.PRESETS[config.model.preset](**shape).to_hf()
    base = config_lib.with_rope(base, dict(config.get("rope", {}) or {}))
    return config_lib.LlamaConfig.from_hf(base).replace(execution=execution(config)), config.init_from or None


def _count(name: str, value, minimum: int = 1, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}{meaning}, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuses run-config values that would otherwise fail, or silently do nothing, after the run started."""
    t, d = config.train, config.data
    for name in ("steps", "save_every", "grad_accum", "loss_chunk"):
        _count(f"train.{name}", t[name])
    _count("train.keep", t.keep, 0, " (0 keeps every checkpoint)")
    for name in ("seq_len", "batch_size"):
        _count(f"data.{name}", d[name])
    sharding.MeshShape.of(config.mesh)  # the typed mesh and execution refuse their bad values here
    execution(config)
    if d.batch_size % t.grad_accum:
        raise ValueError(f"train.grad_accum: expected a divisor of data.batch_size ({d.batch_size}), "
                         f"got {t.grad_accum}")


def load(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """The run config of `configs/<name>.py` with `--config.a.b=value` overrides applied (ml_collections'
    config_flags, the syntax of every command that takes a run config); a bad path, key or value is a
    ValueError naming the flag. `overrides` are the `--config.*` arguments (`a.b=value` without the
    prefix is accepted too: the `--set` spelling of earlier releases)."""
    from absl import flags
    from ml_collections import config_flags

    file = Path(path.split(":")[0]).expanduser()
    if file.is_dir():
        raise ValueError(f"--config: {path} is a directory; expected a config file such as configs/tiny.py")
    if not file.is_file():
        raise ValueError(f"--config: {path} does not exist")
    try:
        module = ast.parse(file.read_bytes(), str(file))
    except SyntaxError as e:
        raise ValueError(f"--config: {file}, line {e.lineno}: {e.msg}") from None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in module.body):
        raise ValueError(f"--config: {file} defines no get_config() (a config file returns its ConfigDict from it)")
    argv = ["prog", f"--config={path}", *(o if o.startswith("--config.") else f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()  # a registry per call: commands may load several configs in one process
    config_flags.DEFINE_config_file("config", None, "configs/<name>.py", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (KeyError, AttributeError) as e:
        raise ValueError(_unknown_key(argv[2:], e)) from None
    except flags.Error as e:
        text = " ".join(str(e).split())
        if "Error whilst parsing config file" in text:  # the file's own error, as a traceback in the text
            text = f"--config: {file}: " + str(e).strip().splitlines()[-1].strip()
        elif "Failed to parse" in text and "as a ConfigDict" in text:  # `--config.rope=yarn`: a whole section
            flag = text.split("flag ")[-1].split("=")[0] if "flag " in text else "--config.*"
            text = f"{flag}: is a section of the run config, not a value; set its keys (e.g. {flag}.KEY=VALUE)"
        raise ValueError(text) from None
    except ImportError as e:
        raise ValueError(f"--config: {file}: {e}") from None


def _unknown_key(overrides: list[str], e: Exception) -> str:
    """The one line for a key the run config does not have (a mistyped override), with the nearest key."""
    while e.args and isinstance(e.args[0], Exception):  # config_flags wraps the KeyError in an AttributeError
        e = e.args[0]
    text = str(e.args[0] if e.args else e)
    key = re.search(r"'([^']+)'", text)
    near = re.search(r'Did you mean "([^"]+)"', text)
    key = key.group(1) if key else ""
    flag = next((o.split("=")[0] for o in overrides if key in o.split("=")[0].split(".")[1:]), "--config.*")
    return (f"{flag}: no such key in the run config" + (f" (did you mean {near.group(1)!r}?)" if near else "")
            + "; see train --print_config")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the `--config.a.b=value` arguments, the others) of a command line."""
    overrides = [a for a in argv if a.startswith("--config.")]
    return overrides, [a for a in argv if not a.startswith("--config.")]
