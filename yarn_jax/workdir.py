"""The trainer's work directory: checked before anything runs, locked while a trainer uses it, and its
metrics file kept to one row per step across resumes.

    WORKDIR/checkpoints/<step>/   Orbax checkpoints (params, optimizer state, data iterator, settings)
    WORKDIR/damaged/<step>/       checkpoints that did not restore, moved aside (never deleted)
    WORKDIR/metrics.jsonl         one JSON row per step
    WORKDIR/tensorboard/          event files
    WORKDIR/.lock                 held (flock) by the trainer using the directory
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from yarn_jax import cli


def prepare(path: str | Path) -> Path:
    """Creates the work directory if needed; refuses a file, or a directory this process cannot write."""
    return cli.writable_dir(path, "--workdir")


class Lock:
    """An exclusive lock on WORKDIR/.lock for the life of the process (the kernel drops it when the process
    ends, kill -9 included): a second trainer on the same work directory is refused."""

    def __init__(self, path: Path):
        self._file = open(path / ".lock", "a+")  # noqa: SIM115  held open for the process's life
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ValueError(f"--workdir: {path} is in use by another trainer (pid {holder}); wait for it to end "
                             "or choose another work directory") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def keep_metrics_before(path: Path, step: int) -> None:
    """Drops the rows of steps >= `step` from metrics.jsonl (a resumed run writes them again), atomically."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{row}\n" for row in rows))
    os.replace(tmp, path)
