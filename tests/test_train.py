"""The trainer: exact resume (also after kill -9 mid-save), SIGTERM, NaN guard, clear config errors."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train_helpers import ROOT, losses, tiny_run_config
from yarn_jax import cli, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("spm")


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    work = tmp_path_factory.mktemp("straight")
    train.Run(tiny_run_config(cache), str(work)).train()
    return losses(work)


def test_resume_is_bit_identical(cache, straight, tmp_path, capsys):
    assert train.Run(tiny_run_config(cache, steps=3), str(tmp_path)).train() == 3
    assert train.Run(tiny_run_config(cache), str(tmp_path)).train() == 6
    assert losses(tmp_path) == straight  # same losses bit for bit, same batch hashes
    capsys.readouterr()
    assert train.Run(tiny_run_config(cache), str(tmp_path)).train() == 6  # finished: says so, trains nothing
    assert "already finished: " in capsys.readouterr().out and losses(tmp_path) == straight
    assert len({h for _, _, h in straight}) == 6
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 500  # TensorBoard scalars were written


def _cli(workdir, cache, *overrides, env=None):
    cfg = tiny_run_config(cache)
    args = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in [
        ("data.sources", cfg.data.sources), ("data.cache_dir", cfg.data.cache_dir)]]
    shape = [f"--config.model.{k}={v}" for k, v in cfg.model.items() if k != "preset" and v is not None]
    shape += [f"--config.data.{k}={cfg.data[k]}" for k in ("tokenizer_vocab", "seq_len", "batch_size", "skip_docs")]
    shape += [f"--config.train.loss_chunk={cfg.train.loss_chunk}", "--config.rope.original_max_position_embeddings=32"]
    shape += [f"--config.mesh.{k}={v}" for k, v in cfg.mesh.items()]
    cmd = [sys.executable, "-m", "yarn_jax.train", f"--config={ROOT / 'configs/tiny.py'}", f"--workdir={workdir}",
           *args, *shape, *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(path, lines, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_kill_9_during_async_saves_resumes_from_last_complete(cache, straight, tmp_path):
    proc = _cli(tmp_path, cache, "--config.train.steps=6", "--config.train.save_every=1")
    _wait_for(tmp_path / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tmp_path / "checkpoints" / "99.orbax-checkpoint-tmp-123").mkdir(parents=True)  # a torn save, for certain
    run = train.Run(tiny_run_config(cache), str(tmp_path))
    resumed_at = int(run.state.step)
    assert 1 <= resumed_at <= 6
    run.train()
    assert losses(tmp_path) == straight  # one row per step: the rows past the resumed step were dropped


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_current_step_and_exits(cache, straight, tmp_path, sig, status):
    proc = _cli(tmp_path, cache, "--config.train.steps=6", "--config.train.save_every=100")
    _wait_for(tmp_path / "metrics.jsonl", 2, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == status and "Traceback" not in out, out
    done = len(losses(tmp_path))
    assert f"{sig.name}: saved step {done}" in out
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [done]
    train.Run(tiny_run_config(cache), str(tmp_path)).train()
    assert losses(tmp_path) == straight


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(cache, straight, tmp_path, capsys):
    train.Run(tiny_run_config(cache, steps=4, save_every=2), str(tmp_path)).train()
    newest = tmp_path / "checkpoints" / "4"
    (newest / "run" / "metadata").write_text("")  # emptied, as a full disk or a torn copy leaves it
    run = train.Run(tiny_run_config(cache), str(tmp_path))
    assert int(run.state.step) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "does not restore" in err and "moved the damaged step 4" in err, err
    assert not newest.exists() and len(list((tmp_path / "damaged").iterdir())) == 1  # kept, out of the way
    assert run.train() == 6
    assert losses(tmp_path) == straight


def test_a_lost_tokenizer_cache_does_not_block_the_resume(cache, straight, tmp_path):
    """The default tokenizer is re-trained identically elsewhere (its model file's bytes differ: they record
    the temporary path and process it was trained under); the resume compares pieces."""
    train.Run(tiny_run_config(cache, steps=3), str(tmp_path / "run")).train()
    assert train.Run(tiny_run_config(tmp_path / "other_cache"), str(tmp_path / "run")).train() == 6
    assert losses(tmp_path / "run") == straight


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(cache, tmp_path, capsys):
    import errno

    run = train.Run(tiny_run_config(cache, steps=4, save_every=2), str(tmp_path))
    save = run.save

    def full_at_4(step, **kw):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "4"))
        save(step, **kw)

    run.save = full_at_4
    assert cli.run(run.train) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "saving a checkpoint failed (no space left on device)" in err, err
    assert "the newest complete checkpoint is step 2" in err and "Traceback" not in err
    assert int(train.Run(tiny_run_config(cache, steps=4, save_every=2), str(tmp_path)).state.step) == 2


def test_keep_0_keeps_every_checkpoint(cache, tmp_path):
    train.Run(tiny_run_config(cache, steps=4, save_every=1, keep=0), str(tmp_path)).train()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3, 4]


def test_nan_stops_the_run_naming_the_step(cache, tmp_path):
    run = train.Run(tiny_run_config(cache, save_every=1, inject_nan_at=2), str(tmp_path))
    with pytest.raises(cli.RunError, match="step 2: loss nan"):
        run.train()
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2]  # the state after the poisoned step (3) was never written


def test_batches_past_cudnns_packed_layout_are_reported_once(cache, tmp_path, monkeypatch, capsys):
    """A GPU step leaves cuDNN's packed layout for the XLA blocks without a word (no host callbacks under
    JAX_PLATFORMS=cuda): the trainer counts each batch's documents and says so. Here no row fits a limit
    of 0, as on a GPU before Hopper."""
    monkeypatch.setattr(train.attention, "packed_documents_limit", lambda execution, mesh, window: 0)
    c = tiny_run_config(cache, steps=2, save_every=2)
    c.data.update(positions="document", batch_size=8)
    c.mesh.update(dict(data=1, fsdp=8, seq=1, tensor=1))
    train.Run(c, str(tmp_path)).train()
    err = capsys.readouterr().err
    assert err.count("documents; cuDNN's packed layout takes 0 a row at most here") == 1
    assert "warning: 2 of 2 steps ran the XLA block attention" in err


@pytest.mark.parametrize("change,message", [
    (lambda c: c.data.update(sources=["/nonexistent/*.txt"]), "data.sources: '/nonexistent/\\*.txt' matches no"),
    (lambda c: c.model.update(vocab_size=300), "vocabulary of 512 tokens is larger than the model's vocab_size"),
    (lambda c: c.mesh.update(seq=8, fsdp=1, data=1), "seq_len: expected a multiple of 2 x the ring size \\(16\\)"),
    (lambda c: c.mesh.update(data=8, fsdp=1, seq=1), "batch: expected a multiple of data\\*fsdp = 8, got 4"),
    (lambda c: c.data.update(positions="sometimes"), "data.positions: expected"),
    (lambda c: c.mesh.update(seq=0), "mesh.seq: expected a positive integer or -1, got 0"),
    (lambda c: c.model.update(remat="sometimes"), "remat: expected one of"),
])
def test_bad_config_is_a_clear_error(cache, tmp_path, change, message):
    c = tiny_run_config(cache)
    change(c)
    if c.mesh.seq == 8:
        c.data.update(seq_len=72, batch_size=8)  # divisible by the ring (8) but not by 2 x 8
    with pytest.raises(ValueError, match=message):
        train.Run(c, str(tmp_path))


def test_resume_refuses_changed_settings(cache, tmp_path):
    train.Run(tiny_run_config(cache, steps=3), str(tmp_path)).train()
    c = tiny_run_config(cache)
    c.data.batch_size = 8
    with pytest.raises(cli.RunError, match="data.batch_size: checkpoint 4, now 8"):
        train.Run(c, str(tmp_path))


def test_unknown_override_key_is_refused(cache, tmp_path):
    proc = _cli(tmp_path, cache, "--config.optim.learning_rate=1e-5")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "learning_rate" in out


def test_two_processes_agree_with_one(cache, straight, tmp_path):
    """Two CPU processes under jax.distributed (4 devices each) train the same 8-device mesh as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        procs.append(_cli(tmp_path, cache, "--config.train.steps=2", env=env))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [loss for _, loss, _ in losses(tmp_path)]
    want = [loss for _, loss, _ in straight[:2]]
    assert got == pytest.approx(want, rel=1e-5)


def test_trainer_checkpoint_exports_to_hugging_face(cache, tmp_path):
    """to-hf reads the trainer's checkpoints (parameters taken out of the train state, sharded on a mesh)."""
    import numpy as np

    from yarn_jax import convert
    from yarn_jax.io import checkpoint, hf_files, hf_layout

    train.Run(tiny_run_config(cache, steps=2, save_every=2), str(tmp_path / "run")).train()
    cfg, params = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoints")
    convert.to_hf(tmp_path / "run" / "checkpoints", tmp_path / "hf")
    weights = hf_files.HfWeights(tmp_path / "hf")
    for t in hf_layout.layout(cfg):
        leaf = hf_layout.get_path(params, t.path)
        for i, name in enumerate(hf_layout.names_of(t, cfg)):
            np.testing.assert_array_equal(weights.get(name), t.to_hf(leaf[i] if t.per_layer else leaf))
