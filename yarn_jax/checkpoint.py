"""Orbax checkpoints: one layout for the converter and the trainer.

    CKPT_DIR/<step>/params   Orbax PyTree of the parameter tree (natural axes, layers stacked)
    CKPT_DIR/<step>/config   JSON: the model config in Hugging Face keys (LlamaConfig.to_hf)
    CKPT_DIR/<step>/...      the trainer adds opt_state, data iterator state, run config

`convert from-hf` writes step 0. Parameters restore leaf by leaf (partial restore), so a 7B model
streams through a small machine, and straight onto a mesh's shardings (each host reads its shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from yarn_jax.config import LlamaConfig

PARAMS, CONFIG = "params", "config"


def manager(directory: str | Path, *, max_to_keep: int | None = None, save_interval_steps: int = 1,
            create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           create=create)
    return ocp.CheckpointManager(str(Path(directory).absolute()), options=options)


def save_params(directory: Path, cfg: LlamaConfig, params: Any, step: int = 0) -> None:
    """Writes params (arrays or memmaps) and the model config as step `step`, and waits for it."""
    mgr = manager(directory)
    mgr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.PyTreeSave(params),
                                              CONFIG: ocp.args.JsonSave(cfg.to_hf())}))
    mgr.wait_until_finished()
    mgr.check_for_errors()
    mgr.close()


def _step(mgr: ocp.CheckpointManager, path: Path, step: int | None) -> int:
    steps = mgr.all_steps()
    if not steps:
        raise ValueError(f"{path}: no complete Orbax checkpoint found (expected CKPT_DIR/<step>/params)")
    if step is None:
        return max(steps)
    if step not in steps:
        raise ValueError(f"--step: {step} is not in {path}; available steps: {sorted(steps)}")
    return step


class Reader:
    """Reads one step of a checkpoint: its model config, then parameter leaves one at a time."""

    def __init__(self, path: str | Path, step: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: checkpoint directory does not exist")
        self._mgr = manager(self.path, create=False)
        self.step = _step(self._mgr, self.path, step)
        hf = self._mgr.restore(self.step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
        self.cfg = LlamaConfig.from_hf(hf)

    def leaves(self, tree: Any, shardings: Any = None) -> Any:
        """Restores the leaves named by `tree` (any values; structure only) as numpy arrays, or as
        jax.Arrays on `shardings` (a matching tree of Shardings)."""
        if shardings is None:
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        else:
            args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
            tree = shardings
        restore = ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True)
        return self._mgr.restore(self.step, args=ocp.args.Composite(**{PARAMS: restore}))[PARAMS]

    def close(self) -> None:
        self._mgr.close()


def load_checkpoint(path: str | Path, mesh: Mesh | None = None, *, step: int | None = None,
                    **execution: Any) -> tuple[LlamaConfig, Any]:
    """(cfg, params) from a checkpoint of `convert from-hf` or of the trainer (newest step by default).

    With `mesh`, parameters restore straight onto their shardings (sharding.RULES); without, as numpy.
    `execution` overrides execution fields of the config (dtype, remat, attention).
    """
    from yarn_jax import sharding
    from yarn_jax.llama import init_params

    reader = Reader(path, step)
    cfg = reader.cfg.replace(**execution) if execution else reader.cfg
    structure = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    shardings = sharding.param_shardings(cfg, mesh) if mesh is not None else None
    params = reader.leaves(structure, shardings)
    reader.close()
    return cfg, params
