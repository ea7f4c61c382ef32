"""`python -m yarn_jax.aot` on real TPU topologies, compiled on this CPU host through libtpu."""

import importlib.util

import pytest

from tests.train_helpers import ROOT
from yarn_jax import aot

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")


def test_topology_names():
    assert aot.parse_topology("v4-8")[1:] == (4, "v4:2x2x1")
    assert aot.parse_topology("v4-128")[1:] == (64, "v4:4x4x4")
    assert aot.parse_topology("v5e-16")[1:] == (16, "v5e:4x4")
    assert aot.parse_topology("v6e-256")[1:] == (256, "v6e:16x16")
    with pytest.raises(ValueError, match="--topology: expected one of"):
        aot.parse_topology("h100-8")
    with pytest.raises(ValueError, match="is not a v4 slice this tool knows"):
        aot.parse_topology("v4-12")


def test_tiny_config_compiles_and_fits_on_v4_8(capsys):
    rc = aot.main(["--config", str(ROOT / "configs/tiny.py"), "--topology", "v4-8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "v4-8 (4 chips, 4 devices" in out and "fits with" in out and "FLOPs per step: compiler" in out


def test_config_that_cannot_fit_fails_with_a_clear_message(capsys):
    # Llama-2-7B-wide layers at 128k tokens per chip, no remat, no ring: activations cannot fit 32 GiB
    rc = aot.main(["--config", str(ROOT / "configs/v4_128k.py"), "--topology", "v4-8",
                   "--set", "model.remat=none", "--set", "model.num_layers=2", "--set", "mesh.seq=1",
                   "--set", "mesh.fsdp=4", "--set", "data.batch_size=4", "--set", "train.grad_accum=1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "DOES NOT FIT" in err and "activations are too big" in err and "mesh.seq" in err
