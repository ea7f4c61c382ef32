"""KV-cache decoding against argmax over a full recomputation at every step, crossing the trained length."""

import jax
import numpy as np
import pytest

import yarn_jax
from tests import hf_models
from yarn_jax import generate

ROPES = {
    "default": None,
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "dynamic_yarn": {"rope_type": "dynamic_yarn", "original_max_position_embeddings": 16},
    "dynamic_ntk": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("rope", ["default", "yarn", "dynamic_yarn"])  # dynamic NTK rebuilds as dynamic YaRN does
def test_cached_greedy_equals_full_recomputation(rope):
    # max_position_embeddings 24: the dynamic methods rescale at every step past it
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=ROPES[rope], max_pos=24).to_dict(),
                                       dtype="float32")
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(1)))  # sharper logits
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    got = generate.generate(cfg, params, prompt, 18)  # 12 -> 30 tokens, crossing 16 and 24
    np.testing.assert_array_equal(got, _recomputed(cfg, params, prompt, 18, lambda n: n))


def test_prompts_of_different_lengths_in_one_batch_equal_recomputation():
    """Rows of 12, 5 and 17 tokens in one batch (right-padded, each at its own positions) with dynamic
    YaRN at each row's own length (the cache rebuilt when any row's frequencies move; until then the
    device loop): every row's tokens equal that prompt's full recomputation alone."""
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=ROPES["dynamic_yarn"], max_pos=24).to_dict(),
                                       dtype="float32")
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (12, 5, 17)]
    got = generate.complete(cfg, params, prompts, 10)  # 17 -> 27 crosses 24, 5 -> 15 stays inside 16
    for row, p in zip(got, prompts, strict=True):
        np.testing.assert_array_equal(row, _recomputed(cfg, params, p[None], 10, lambda n: n)[0, len(p):])


def _recomputed(cfg, params, prompt, new, scale_len):
    """The oracle: the whole sequence recomputed at every step, dynamic methods at scale_len(length)."""
    seq = np.zeros((prompt.shape[0], prompt.shape[1] + new), np.int32)  # causal: the zeros never matter
    seq[:, :prompt.shape[1]] = prompt
    dynamic = cfg.rope_scaling.rope_type in ("dynamic", "dynamic_yarn")
    for n in range(prompt.shape[1], seq.shape[1]):
        logits = yarn_jax.forward(cfg, params, seq, seq_len=scale_len(n) if dynamic else None)
        seq[:, n] = np.asarray(logits[:, n - 1].argmax(-1))
    return seq


def test_keeping_a_stale_cache_would_differ_for_dynamic_yarn():
    """The trap the rebuild avoids: a cache built at length 25 then extended to 26 (dynamic YaRN rescales
    there) gives other logits than a recomputation, even though the new token's frequencies are right."""
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=ROPES["dynamic_yarn"], max_pos=24)
                                       .to_dict(), dtype="float32")
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(1)))
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 26))
    full = yarn_jax.forward(cfg, params, seq, seq_len=26)[:, -1]
    cache = generate.init_cache(cfg, 2, 26)
    # the first 25 tokens against the empty cache's slots (prefill=False: no padding to the cache length)
    _, cache = generate.step(cfg, params, cache, seq[:, :25], 0, generate.frequencies(cfg, 25), prefill=False)
    stale, _ = generate.step(cfg, params, cache, seq[:, 25:], 25, generate.frequencies(cfg, 26), prefill=False)
    assert float(np.abs(stale - full).max()) > 1e-2


def test_dynamic_bucket_equals_recomputation_at_the_bucketed_length():
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=ROPES["dynamic_yarn"], max_pos=24)
                                       .to_dict(), dtype="float32")
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(1)))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
    got = generate.generate(cfg, params, prompt, 20, dynamic_bucket=8)
    np.testing.assert_array_equal(got, _recomputed(cfg, params, prompt, 20, lambda n: -(-n // 8) * 8))


def test_sampling_is_seeded_and_stops_at_eos():
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config().to_dict(), dtype="float32")
    params = yarn_jax.init_params(cfg, jax.random.key(0))
    prompt = np.ones((3, 5), np.int32)
    a = generate.generate(cfg, params, prompt, 8, temperature=1.0, key=jax.random.key(7))
    b = generate.generate(cfg, params, prompt, 8, temperature=1.0, key=jax.random.key(7))
    np.testing.assert_array_equal(a, b)
    eos = int(a[0, 6])
    c = generate.generate(cfg, params, prompt, 8, temperature=1.0, key=jax.random.key(7), eos_id=eos)
    assert (c[0, 6:] == eos).all()


def test_the_device_loop_in_chunks_equals_one_chunk(monkeypatch):
    """Chunk boundaries change nothing: greedy and seeded samples equal those of one chunk (a key split
    per token, carried across chunks); all rows past EOS end the loop early. (One chunk against
    recomputation: test_cached_greedy_equals_full_recomputation.)"""
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=ROPES["yarn"], max_pos=64).to_dict(),
                                       dtype="float32")
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(1)))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 12))
    sample = dict(temperature=1.0, key=jax.random.key(3))
    greedy, sampled = generate.generate(cfg, params, prompt, 18), generate.generate(cfg, params, prompt, 18, **sample)
    monkeypatch.setattr(generate, "DECODE_CHUNK", 6)
    np.testing.assert_array_equal(generate.generate(cfg, params, prompt, 18), greedy)
    np.testing.assert_array_equal(generate.generate(cfg, params, prompt, 18, **sample), sampled)
    eos, chunks, real = int(sampled[0, 13]), [], generate.decode_chunk  # EOS in the first chunk of three
    monkeypatch.setattr(generate, "decode_chunk", lambda *a, **k: chunks.append(1) or real(*a, **k))
    stopped = generate.generate(cfg, params, prompt, 18, eos_id=eos, **sample)
    assert (stopped[0, 13:] == eos).all() and stopped.shape == (1, 30) and len(chunks) == 1


def test_a_decode_step_on_per_layer_weights_equals_the_layer_loop():
    """The decode loop's form, each layer's weights apart (`llama.unstack_layers`, the layers unrolled) at
    batch 1 (one row, which `projection.dot` pads to two), gives the logits and cache of the stacked layer
    loop that the host loop and the prefill run."""
    import jax.numpy as jnp

    from yarn_jax.model.llama import unstack_layers

    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=ROPES["yarn"], max_pos=64).to_dict(),
                                       dtype="float32")
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(1)))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 9)
    freqs = generate.row_frequencies(cfg, [9])
    outs = []
    for p in (params, unstack_layers(params)):
        logits, cache = generate._prefill(cfg, params, generate.init_cache(cfg, 1, 256), [prompt], freqs, None)
        nxt = jnp.argmax(logits, axis=-1)[:, None].astype(jnp.int32)
        outs.append(generate.step(cfg, p, cache, nxt, jnp.asarray([9]), freqs, prefill=False))
    (want, want_cache), (got, got_cache) = outs
    assert len(unstack_layers(params)["layers"]) == cfg.num_layers
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_cache, want_cache, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


SEQ_MESHES = [("yarn", dict(seq=4, fsdp=2)), ("dynamic_yarn", dict(seq=4, fsdp=2)),
              ("dynamic_yarn", dict(seq=2, tensor=2, fsdp=2)), ("dynamic_yarn", dict(data=2, seq=4)),
              ("yarn", dict(seq=4, fsdp=2), dict(family="mistral", sliding_window=6))]


@pytest.mark.parametrize("case", SEQ_MESHES, ids=[f"{c[0]}-" + ",".join(f"{k}={v}" for k, v in c[1].items())
                                                  + ("-mistral-window6" if len(c) > 2 else "") for c in SEQ_MESHES])
def test_generation_on_a_mesh_equals_one_device(case):
    """With seq > 1 the prompt prefills with ring attention and the cache stays split over seq in the
    ring's order; each decode step attends per shard, merged by lse. 12 -> 28 tokens cross
    original_max_position_embeddings (16) and max_position_embeddings (24): dynamic YaRN rebuilds the
    cache (a ring prefill) at every step past 24. Mistral's window of 6 tokens spans several of the ring's
    blocks and of the cache's shards (without it 58 of the 64 tokens differ)."""
    from yarn_jax import sharding

    rope, mesh_shape, family = case[0], case[1], (case[2] if len(case) > 2 else {})
    # 97 tokens: a vocabulary that tensor = 2 does not divide (a Llama fine-tune with 32001 is real): replicated
    cfg = yarn_jax.LlamaConfig.from_hf(hf_models.hf_config(rope_scaling=ROPES[rope], max_pos=24, vocab=97,
                                                           **family).to_dict(), dtype="float32")
    params = jax.tree.map(lambda x: x * 4, yarn_jax.init_params(cfg, jax.random.key(1)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (12, 7, 12, 3)]  # one batch, right-padded
    want = generate.complete(cfg, params, prompts, 16)
    got = generate.complete(cfg, params, prompts, 16, mesh=sharding.make_mesh(**mesh_shape))
    np.testing.assert_array_equal(got, want)

