"""Orbax checkpoints (checkpoint.py): loading onto a mesh with the training rules' shardings, and the
master-weight dtype."""

import jax
import numpy as np

from tests import hf_models
from yarn_jax import convert, sharding
from yarn_jax.io import checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def test_load_checkpoint_onto_a_mesh(tmp_path):
    model = hf_models.hf_model(hf_models.hf_config(rope_scaling=YARN))
    model.save_pretrained(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "ckpt")
    mesh = sharding.make_mesh(fsdp=2, tensor=2, data=-1)
    cfg, params = checkpoint.load_checkpoint(tmp_path / "ckpt", mesh, dtype="float32")
    q = params["layers"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "seq"), "tensor", None)
    _, host = checkpoint.load_checkpoint(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(q), host["layers"]["attn"]["q"])
    # a bf16 checkpoint restores onto a mesh as float32 master weights (cfg.param_dtype), values unchanged
    convert.from_hf(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
    _, masters = checkpoint.load_checkpoint(tmp_path / "bf16", mesh)
    _, stored = checkpoint.load_checkpoint(tmp_path / "bf16")
    assert masters["embedding"].dtype == np.float32 and stored["embedding"].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(masters["embedding"]), stored["embedding"].astype(np.float32))
