"""Orbax checkpoints: one layout for the converter and the trainer.

    CKPT_DIR/<step>/params   Orbax PyTree of the parameter tree (natural axes, layers stacked); written
                             leaf by leaf (Orbax partial save, the tree then sits in params/state) by the
                             converter, in one save by the trainer
    CKPT_DIR/<step>/config   JSON: the model config in Hugging Face keys (LlamaConfig.to_hf)
    CKPT_DIR/<step>/...      the trainer adds opt_state, data iterator state, run config

`convert from-hf` writes step 0. Parameters restore leaf by leaf (partial restore), so a 7B model
streams through a small machine, and straight onto a mesh's shardings (each host reads its shards).
"""

from __future__ import annotations

from collections.abc import Iterator
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


def save_params_streamed(directory: Path, cfg: LlamaConfig, subtrees: Iterator[Any], step: int = 0) -> None:
    """Writes the model config, then the parameters one subtree at a time (Orbax partial save), so only
    one subtree is in memory at once; the tree becomes readable when the last one is finalised."""
    from orbax.checkpoint.experimental import v1 as ocp_v1

    mgr = manager(directory)
    mgr.save(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonSave(cfg.to_hf())}))
    mgr.wait_until_finished()
    mgr.check_for_errors()
    mgr.close()
    target = Path(directory).absolute() / str(step) / PARAMS
    for subtree in subtrees:
        ocp_v1.partial.save(target, subtree)
        del subtree  # before the generator builds the next one: one subtree alive at a time
    ocp_v1.partial.finalize(target)


def _params_dir(step_dir: Path) -> Path:
    """The PyTree directory of a step: params/ (one save) or params/state/ (partial saves)."""
    nested = step_dir / PARAMS / "state"
    return nested if (nested / "_METADATA").exists() else step_dir / PARAMS


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
        self.params_dir = _params_dir(self.path.absolute() / str(self.step))
        self._checkpointer = ocp.PyTreeCheckpointer()

    def metadata(self) -> Any:
        """The stored parameter tree's array metadata (shape, dtype), without reading any array."""
        return self._checkpointer.metadata(self.params_dir).item_metadata.tree

    def leaves(self, tree: Any, shardings: Any = None) -> Any:
        """Restores the leaves named by `tree` as numpy arrays in their stored dtype (tree: structure
        only), or, with `shardings` (a matching tree of Shardings; tree: ShapeDtypeStructs), as
        jax.Arrays on those shardings cast to the tree's dtypes (e.g. bf16 weights -> float32 masters)."""
        if shardings is None:
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        else:
            args = jax.tree.map(lambda t, s: ocp.ArrayRestoreArgs(sharding=s, dtype=t.dtype), tree, shardings)
            tree = shardings
        restore = ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True)
        return self._checkpointer.restore(self.params_dir, args=restore)

    def close(self) -> None:
        self._mgr.close()
        self._checkpointer.close()


def load_checkpoint(path: str | Path, mesh: Mesh | None = None, *, step: int | None = None,
                    **execution: Any) -> tuple[LlamaConfig, Any]:
    """(cfg, params) from a checkpoint of `convert from-hf` or of the trainer (newest step by default).

    With `mesh`, parameters restore straight onto their shardings (sharding.RULES) in cfg.param_dtype;
    without, as numpy in the stored dtype.
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
