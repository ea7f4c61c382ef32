"""The execution policy: each field validated, named in its error; the architecture check that needs both."""

import pytest

from yarn_jax.model import config
from yarn_jax.model.execution import AttentionImpl, Execution, Remat


def test_invalid_execution_policy_names_the_field():
    with pytest.raises(ValueError, match="^dtype: "):
        Execution(dtype="fp8")
    with pytest.raises(ValueError, match="^remat: "):
        Execution(remat="sometimes")
    with pytest.raises(ValueError, match="^scan_unroll: "):
        Execution(scan_unroll=0)


def test_strings_become_members_and_the_architecture_is_kept():
    cfg = config.tiny().with_execution(remat="full", attention="reference", dtype="float32")
    assert cfg.execution.remat is Remat.FULL and cfg.execution.attention is AttentionImpl.REFERENCE
    assert cfg.replace(execution=Execution()) == config.tiny()
    # the compute dtype, remat and kernel are not in config.json
    assert cfg.to_hf() == config.tiny().with_execution(remat="none").to_hf()
