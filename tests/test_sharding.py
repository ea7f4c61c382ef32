"""The sharded model (sharding.py's rules, ring attention over `seq`) against one device, on meshes of
8 fake CPU devices; the batch checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import yarn_jax
from tests import hf_models
from tests.tolerances import GRAD_REORDER_ATOL, GRAD_REORDER_RTOL, REORDER_ATOL, REORDER_RTOL
from yarn_jax import sharding

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
MESHES = [dict(data=2, seq=4), dict(seq=8), dict(fsdp=2, seq=2, tensor=2)]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_sharded_model_logits_and_grads_equal_single_device(mesh_shape):
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=YARN, max_pos=64).to_dict(),
                                       dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    b, t = 2, 64  # past original_max_position_embeddings (16)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)))
    segment_ids = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1))
    positions = jnp.asarray(np.concatenate([np.arange(t)[None], (np.arange(t) % 23)[None]]))
    assert_sharded_equals_one_device(cfg, params, sharding.make_mesh(**mesh_shape), tokens, positions, segment_ids)


def test_offloaded_layer_inputs_on_a_mesh_equal_single_device():
    """Remat 'offload' with the layer inputs sharded over fsdp, seq (the ring) and tensor: each device's
    share goes to host memory and comes back for the backward, equal to one device's gradients."""
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=YARN, max_pos=64).to_dict(),
                                       dtype="float32", remat="offload")
    params = yarn_jax.init_params(cfg, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 64)))
    assert_sharded_equals_one_device(cfg, params, sharding.make_mesh(fsdp=2, seq=2, tensor=2), tokens)


def assert_sharded_equals_one_device(cfg, params, mesh, tokens, positions=None, segment_ids=None):
    """Logits and parameter gradients of a loss over them on `mesh` (parameters placed by the rules) equal
    one device's; shared by the model families' tests."""
    placed = jax.device_put(params, yarn_jax.model.llama.param_shardings(cfg, mesh))

    def loss(p, m):
        logits = yarn_jax.forward(cfg, p, tokens, positions, segment_ids, mesh=m)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, None)
    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(placed, mesh)
    np.testing.assert_allclose(got, want, rtol=REORDER_RTOL, atol=REORDER_ATOL)
    jax.tree.map(lambda a, b_: np.testing.assert_allclose(a, b_, rtol=GRAD_REORDER_RTOL, atol=GRAD_REORDER_ATOL),
                 g_got, g_want)


def test_mesh_and_batch_errors():
    with pytest.raises(ValueError, match="data\\*fsdp\\*seq\\*tensor = 4 but there are 8"):
        sharding.make_mesh(seq=4)
    with pytest.raises(ValueError, match="mesh: unknown axis \\['pipeline'\\]"):
        sharding.make_mesh(pipeline=2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh(seq=-1, data=-1)
    with pytest.raises(ValueError, match="batch: expected a multiple of data\\*fsdp = 4"):
        sharding.check_batch(sharding.make_mesh(data=2, fsdp=2, seq=2), 2, 64)
