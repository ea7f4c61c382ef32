"""The model, the Pallas splash kernel and the ring compile for a real TPU topology on this CPU host
(libtpu + jax.experimental.topologies). Skips only if libtpu is absent."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import yarn_jax
from yarn_jax import hlo, sharding

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")


def _topology_mesh(shape):
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu",
                                           chip_config_name="megacore").devices
    return Mesh(np.asarray(devices[: int(np.prod(shape))]).reshape(shape), sharding.AXES)


@pytest.mark.parametrize("mesh_shape,attention", [((1, 4, 1, 1), "splash"), ((1, 2, 2, 1), "auto"),
                                                  ((1, 1, 4, 1), "auto")])
def test_train_gradient_compiles_for_tpu_v4(mesh_shape, attention):
    cfg = yarn_jax.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=64, rope_scaling=yarn_jax.scaling.Yarn(4.0, 256),
                               execution=yarn_jax.Execution(attention=attention, remat="full"))
    mesh = _topology_mesh(mesh_shape)
    p_shard = yarn_jax.llama.param_shardings(cfg, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(lambda: yarn_jax.init_params(cfg, jax.random.key(0))), p_shard)
    tokens = jax.ShapeDtypeStruct((4, 2048), jnp.int32, sharding=sharding.batch_sharding(mesh))
    segments = jax.ShapeDtypeStruct((4, 2048), jnp.int32, sharding=sharding.batch_sharding(mesh))

    def loss(p, t, s):
        return -jnp.mean(jax.nn.log_softmax(yarn_jax.forward(cfg, p, t, segment_ids=s, mesh=mesh))[..., 0])

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens, segments).compile()
    text = compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    if attention == "splash":
        assert "splash" in text or "tpu_custom_call" in text
    if mesh_shape[2] > 1:  # K/V travel around the ring, every ring loop running splash blocks
        assert "collective-permute" in text
        loops = hlo.ring_loop_kernels(text)  # a ring of 2 has one step after its first: no loop is left
        assert (loops or mesh_shape[2] == 2) and all(kernels["tpu_custom_call"] > 0 for kernels in loops), loops
    assert isinstance(NamedSharding(mesh, PartitionSpec()), NamedSharding)
