"""Fine-tune (or pretrain) a LLaMA with YaRN: the product's main job.

    python -m yarn_jax.train --config configs/tiny.py --workdir /tmp/yarn_tiny [--config.optim.lr=1e-5]

    python -m yarn_jax.train --config configs/tiny.py --print_config   # every key of the run config

Everything the run needs is checked before the first step (config values, paths, a writable work
directory, data that reads as text). Restores from the newest checkpoint in WORKDIR/checkpoints that
restores cleanly (one that does not is moved to WORKDIR/damaged/ with a warning, never deleted; a
resume is refused only when the model, batch, sequence length or data settings differ, the tokenizer
compared by its content, wherever it lies), else initialises from `config.init_from` (a `convert from-hf` checkpoint) or
randomly. Writes WORKDIR/metrics.jsonl (one row per step) and checkpoints (params, optimizer state, data
iterator state, configs) and WORKDIR/checkpoints/tokenizer (the tokenizer it trains with: `data.tokenizer`,
else the `init_from` checkpoint's, else a SentencePiece model trained on the data and cached). SIGTERM
saves at the current step and exits 0, SIGINT (Ctrl-C) saves and exits
130; a NaN or Inf loss or gradient stops the run naming the step, with no checkpoint of the poisoned
state; a second trainer on a work directory in use is refused (WORKDIR/.lock).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from yarn_jax import attention, cli, hardware, sharding, workdir
from yarn_jax import train_step as ts
from yarn_jax.attention import cudnn
from yarn_jax.attention.window import effective
from yarn_jax.io import checkpoint, data
from yarn_jax.io import tokenizer as tokenizer_lib
from yarn_jax.model import config as config_lib
from yarn_jax.run_config import model_config, validate


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when launched as one of several processes (explicit JAX_* variables,
    a multi-task Slurm job or a multi-host TPU slice); a no-op for one process."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def data_config(config: ml_collections.ConfigDict) -> data.DataConfig:
    d = config.data
    sources = tuple(d.sources) if d.sources else tuple(data.stdlib_corpus())
    data.check_sources(sources, d.format, d.field)
    carried = checkpoint.tokenizer_of(config.init_from) if config.init_from else None
    tokenizer = d.tokenizer or (str(carried) if carried else None) or tokenizer_lib.train_sentencepiece(
        list(data.expand(sources)), d.tokenizer_vocab, d.get("cache_dir", "~/.cache/yarn_jax"))
    return data.DataConfig(sources=sources, tokenizer=tokenizer, seq_len=d.seq_len, batch_size=d.batch_size,
                           format=d.format, field=d.field, positions=d.positions, packing=d.packing, seed=d.seed,
                           shuffle=d.shuffle, skip_docs=d.skip_docs)


def run_settings(cfg: config_lib.LlamaConfig, dcfg: data.DataConfig, config: ml_collections.ConfigDict) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {"model": cfg.to_hf(), "data": dcfg.settings(), "grad_accum": config.train.grad_accum}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


class Run:
    """One training run: mesh, model, optimizer, data, checkpoints, loop."""

    stopped_by: int | None = None  # the signal that asked the loop to save and stop

    def __init__(self, config: ml_collections.ConfigDict, work: str):
        maybe_initialize_distributed()
        validate(config)
        self.config, self.workdir = config, workdir.prepare(work)
        self.lock = workdir.Lock(self.workdir) if jax.process_index() == 0 else None
        self.cfg, init_from = model_config(config)
        if config.data.seq_len > self.cfg.max_position_embeddings:
            raise ValueError(f"data.seq_len: {config.data.seq_len} is above the model's max_position_embeddings "
                             f"({self.cfg.max_position_embeddings}); set rope.max_position_embeddings to the "
                             "extended length, or train on shorter chunks")
        self.dcfg = data_config(config)
        self.tokenizer = tokenizer_lib.load(self.dcfg.tokenizer, "data.tokenizer")
        self.tokenizer.check_fits(self.cfg.vocab_size, "data.tokenizer")
        self.mesh = sharding.MeshShape.of(config.mesh).build()
        step = ts.build(config, self.cfg, self.mesh)
        self.tx, self.abstract, self.shardings = step.tx, step.abstract, step.shardings
        self.batch_sharding, self.step_fn = step.batch_sharding, step.fn
        self.batches = data.Batches(self.dcfg, jax.process_index(), jax.process_count())
        window = effective(self.cfg.sliding_window, self.dcfg.seq_len)
        self.documents_limit = (attention.packed_documents_limit(self.cfg.execution, self.mesh, window)
                                if self.dcfg.positions is data.Positions.DOCUMENT else None)
        self.over_limit = 0  # steps whose batch had a row of more documents than `documents_limit`
        self.manager = checkpoint.manager(self.workdir / "checkpoints", max_to_keep=config.train.keep or None)
        self.settings = run_settings(self.cfg, self.dcfg, config)
        self.state = self._restore() or self._initial_state(init_from)
        self._keep_tokenizer()

    # ------------------------------------------------------------------------- state

    def _initial_state(self, init_from: str | None) -> ts.TrainState:
        if init_from:
            _, params = checkpoint.load_checkpoint(init_from, self.mesh,
                                                  param_dtype=self.cfg.execution.param_dtype)
        else:
            from yarn_jax.model.llama import init_params

            init = jax.jit(lambda k: init_params(self.cfg, k), out_shardings=self.shardings.params)
            params = init(jax.random.key(self.config.seed))
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
        return jax.device_put(ts.TrainState(params, opt_state, jnp.zeros((), jnp.int32)), self.shardings)

    def _keep_tokenizer(self) -> None:
        """WORKDIR/checkpoints/tokenizer: the tokenizer this run trains with (after a resume, which refuses
        a different one), for eval, generate and `convert to-hf` to use by default."""
        ckpts = self.workdir / "checkpoints"
        held = checkpoint.tokenizer_of(ckpts)
        if jax.process_index() == 0 and (held is None or tokenizer_lib.load(held).fingerprint()
                                         != self.tokenizer.fingerprint()):
            checkpoint.save_tokenizer(ckpts, self.tokenizer)

    def _restore(self) -> ts.TrainState | None:
        """The newest checkpoint that restores; newer ones that do not are moved to WORKDIR/damaged."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                state = self._restore_step(step)
            except cli.RunError:  # a real difference of settings: refuse, whatever older steps hold
                raise
            except Exception as e:  # noqa: BLE001  a damaged step fails in Orbax, TensorStore or JSON
                print(f"warning: checkpoint step {step} in {self.workdir / 'checkpoints'} does not restore "
                      f"({cli.one_line(str(e))[:200]})" + ("; trying the previous one" if i + 1 < len(steps) else ""),
                      file=sys.stderr, flush=True)
                continue
            self._set_aside(steps[:i])
            return state
        if steps:
            raise cli.RunError(f"{self.workdir / 'checkpoints'}: no checkpoint restores (steps {steps}); move the "
                             "directory away to start afresh")
        return None

    def _set_aside(self, damaged: list[int]) -> None:
        """Moves damaged steps out of the way of new saves (to WORKDIR/damaged/<step>), keeping them."""
        for step in damaged:
            target = self.workdir / "damaged" / f"{step}-{int(time.time())}"
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(self.workdir / "checkpoints" / str(step)), target)
            print(f"warning: moved the damaged step {step} to {target}", file=sys.stderr, flush=True)
        if damaged:
            self.manager.reload()

    def _restore_step(self, step: int) -> ts.TrainState:
        run = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
        diffs = _differences(run["settings"], json.loads(json.dumps(self.settings)))
        if diffs:
            raise cli.RunError(f"{self.workdir}: refusing to resume from step {step}: " + "; ".join(diffs))
        restore = lambda tree: ocp.args.PyTreeRestore(  # noqa: E731
            item=tree, restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                                                 tree))
        got = self.manager.restore(step, args=ocp.args.Composite(
            params=restore(self.abstract.params), opt_state=restore(self.abstract.opt_state)))
        self.batches.set_state(run["data_state"])
        print(f"resumed from step {step} in {self.workdir / 'checkpoints'}", flush=True)
        return jax.device_put(ts.TrainState(got["params"], got["opt_state"], jnp.asarray(step, jnp.int32)),
                              self.shardings)

    def save(self, step: int, *, force: bool = False) -> None:
        run = {"settings": self.settings, "data_state": self.batches.get_state(), "step": step}
        self.manager.save(step, force=force, args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(self.state.params), opt_state=ocp.args.PyTreeSave(self.state.opt_state),
            config=ocp.args.JsonSave(self.cfg.to_hf()), run=ocp.args.JsonSave(json.loads(json.dumps(run)))))

    def _saves_ok(self, call) -> None:
        """Runs `call` (a save, or a check of the saves under way), turning a failed save (a full disk, ...)
        into a one-line RunError; Orbax reports an asynchronous save's failure at the next check, one step
        after the save began."""
        try:
            call()
        except Exception as e:  # noqa: BLE001  Orbax and TensorStore raise ValueError / RuntimeError / OSError
            text = cli.one_line(str(e))
            reason = "no space left on device" if ("No space left" in text or "ENOSPC" in text) else text[:300]
            with contextlib.suppress(Exception):  # let the saves begun before this one finish, if they can
                self.manager.wait_until_finished()
            good = [s for s in self.manager.all_steps(read=True) if (self.workdir / "checkpoints" / str(s)).is_dir()]
            raise cli.RunError(f"{self.workdir / 'checkpoints'}: saving a checkpoint failed ({reason}); the newest "
                               f"complete checkpoint is step {max(good) if good else 'none'}") from None

    # ------------------------------------------------------------------------- loop

    def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def train(self) -> int:
        tcfg = self.config.train
        if int(self.state.step) >= tcfg.steps:  # a finished run, started again: nothing to do, say so
            self.batches.close()
            if self.lock is not None:
                self.lock.release()
            self.manager.close()
            if jax.process_index() == 0:
                print(f"already finished: {self.workdir / 'checkpoints'} holds step {int(self.state.step)} of "
                      f"train.steps = {tcfg.steps}; raise --config.train.steps to train further", flush=True)
            return int(self.state.step)
        # a failed background save (Orbax's threads) is reported once, by `_saves_ok`, not as a thread traceback
        threading.excepthook = lambda args: print(f"warning: background {args.thread.name}: "
                                                  f"{cli.one_line(str(args.exc_value))[:200]}", file=sys.stderr)
        # SIGTERM (preemption) and SIGINT (Ctrl-C) both end the current step, save it and stop
        previous = {sig: signal.signal(sig, lambda sig, _: self.__setattr__("stopped_by", sig))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        start = int(self.state.step)
        log = _Log(self.workdir, start, tcfg.steps, ts.flops_per_token(self.cfg, self.dcfg.seq_len))
        try:
            for step in range(start, tcfg.steps):
                log.write(self._step(step))
                done = step + 1
                if self.stopped_by is not None:
                    self._saves_ok(functools.partial(self.save, done, force=True))
                    print(f"\n{signal.Signals(self.stopped_by).name}: saved step {done}; exiting", flush=True)
                    break
                if done % tcfg.save_every == 0 or done == tcfg.steps:
                    self._saves_ok(functools.partial(self.save, done))
                self._saves_ok(self.manager.check_for_errors)
        finally:
            log.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._saves_ok(self.manager.wait_until_finished)
            self.batches.close()
            if self.lock is not None:
                self.lock.release()
        self.manager.close()
        end = int(self.state.step)
        if log.primary and end > start:
            print(f"trained steps {start + 1}-{end}: final loss {log.loss:.4f}, {statistics.median(log.rates):,.0f} "
                  f"tokens/s (median), checkpoint {self.workdir / 'checkpoints' / str(self.manager.latest_step())}",
                  flush=True)
        if self.over_limit:
            print(f"warning: {self.over_limit} of {end - start} steps ran the XLA block attention (rows of more "
                  f"than {self.documents_limit} documents)", file=sys.stderr, flush=True)
        return end

    def _step(self, step: int) -> dict[str, Any]:
        """Runs step `step` on the next batch; its metrics record. A non-finite loss stops the run."""
        t0 = time.perf_counter()
        local = next(self.batches)
        t1 = time.perf_counter()
        if self.documents_limit is not None:
            self._count_documents(step, local["segment_ids"])
        scale = jnp.float32(np.nan if step == self.config.train.get("inject_nan_at", -1) else 1.0)
        self.state, m = self.step_fn(self.state, self._global_batch(local), scale)
        loss, grad_norm = float(m["loss"]), float(m["grad_norm"])  # the step's only host sync
        t2 = time.perf_counter()
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            raise cli.RunError(f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite; "
                               "stopped without saving this state")
        return {"step": step, "loss": loss, "grad_norm": grad_norm,
                "tokens_per_s": self.dcfg.batch_size * self.dcfg.seq_len / (t2 - t0),
                "data_wait_s": t1 - t0, "compute_s": t2 - t1, "batch_hash": ts.batch_hash(local["tokens"])}

    def _count_documents(self, step: int, segment_ids: np.ndarray) -> None:
        """Warns (once) when a batch's attention leaves cuDNN's packed layout for the XLA block kernel: the
        step cannot say so itself (no host callbacks under JAX_PLATFORMS=cuda)."""
        most = int(cudnn.documents(segment_ids).max())
        if most <= self.documents_limit:
            return
        if not self.over_limit:
            print(f"warning: step {step}: a row holds {most} documents; cuDNN's packed layout takes "
                  f"{self.documents_limit} a row at most here (none before Hopper or with a sliding window), so "
                  "batches like it run the XLA block attention (exact, several times slower)", file=sys.stderr,
                  flush=True)
        self.over_limit += 1


class _Log:
    """Where each step's record goes (process 0 only): one row of WORKDIR/metrics.jsonl (rows at and after
    the first step of this run, left by an earlier run, are dropped first), TensorBoard, the progress bar."""

    def __init__(self, work: Path, start: int, steps: int, flops_per_token: float):
        self.primary = jax.process_index() == 0
        if self.primary:
            workdir.keep_metrics_before(work / "metrics.jsonl", start)
        self.file = open(work / ("metrics.jsonl" if self.primary else os.devnull), "a")  # noqa: SIM115
        self.board = _tensorboard(work) if self.primary else None
        self.bar = _progress(start, steps)
        self.flops, self.peak = flops_per_token, hardware.peak_flops(jax.devices()[0])
        self.loss, self.rates = float("nan"), []

    def write(self, record: dict[str, Any]) -> None:
        if self.peak:
            record["mfu"] = record["tokens_per_s"] * self.flops / (self.peak * jax.device_count())
        self.loss = record["loss"]
        self.rates.append(record["tokens_per_s"])
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "batch_hash"):
                    self.board.add_scalar(f"train/{key}", value, record["step"])
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                             **({"mfu": f"{record['mfu']:.1%}"} if self.peak else {}))

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.board is not None:
            self.board.close()


def _tensorboard(workdir: Path):
    """TensorBoard event files in WORKDIR/tensorboard (`tensorboard --logdir WORKDIR`)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"), flush_secs=10)


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, desc="train", dynamic_ncols=True, disable=jax.process_index() != 0)


def parse(argv: list[str]):
    """(run config, workdir, print_config) from the command line (program name first); bad flags are a
    ValueError naming them."""
    from yarn_jax import run_config

    overrides, rest = run_config.split_overrides(argv[1:])
    p = cli.ArgumentParser(prog="python -m yarn_jax.train", description=__doc__,
                           epilog="--config.KEY=VALUE overrides any key of the run config (see --print_config)")
    p.add_argument("--config", help="configs/<name>.py")
    p.add_argument("--workdir", help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--print_config", "--print-config", action="store_true",
                   help="print the resolved run config (every key) and exit")
    a = p.parse_args(rest)
    if a.config is None:
        raise ValueError("--config: required (a file such as configs/tiny.py)")
    return run_config.load(a.config, overrides), a.workdir, a.print_config


def main(argv: list[str]) -> int:
    def run() -> int:
        config, work, show = parse(argv)
        if show:
            print(config)
            return 0
        if not work:
            raise ValueError("--workdir: required (where checkpoints and metrics.jsonl go)")
        validate(config)  # before anything is written to the work directory
        from absl import logging

        # Orbax logs every file it renames (INFO), deprecations (WARNING) and, when a background save fails,
        # its tracebacks (ERROR): all of it goes to WORKDIR/logs, the terminal gets one line per problem
        logs = workdir.prepare(work) / "logs"
        logs.mkdir(exist_ok=True)
        logging.get_absl_handler().use_absl_log_file("train", str(logs))
        logging.set_verbosity(logging.WARNING)
        trainer = Run(config, work)
        trainer.train()
        return 130 if trainer.stopped_by == signal.SIGINT else 0

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
