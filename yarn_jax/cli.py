"""How every command-line entry point reports a user's error: one line, `error: <field or file>: <what>`.

`run(fn)` calls `fn() -> exit status` and turns the project's input errors (`ValueError`, naming the
field) and the expected OS errors (a missing or unwritable file, a full disk) into that line, with exit
status 2 for bad input and 1 for a run that failed mid-way (`RunError`) or whose shapes do not fit the
device's memory (XLA's RESOURCE_EXHAUSTED, with what to change). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

BAD_INPUT, FAILED = 2, 1


class RunError(RuntimeError):
    """A run that had to stop part-way (NaN loss, a refused resume, a full disk); the message says why."""


_OS_REASONS = {errno.ENOENT: "does not exist", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
               errno.ENOSPC: "no space left on device", errno.EEXIST: "already exists",
               errno.ENOTDIR: "a parent is not a directory", errno.EISDIR: "is a directory",
               errno.EDQUOT: "disk quota exceeded"}


def os_message(e: OSError) -> str:
    """'PATH: reason' for an OSError."""
    reason = _OS_REASONS.get(e.errno, e.strerror or str(e))
    return f"{e.filename}: {reason}" if e.filename else reason


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str, status: int = BAD_INPUT) -> int:
    print(f"error: {one_line(message)}", file=sys.stderr)
    return status


def skip_absent_tpu() -> None:
    """On a host without TPU chips (no /dev/accel*, no /dev/vfio), keeps jax from starting libtpu, which the
    `tpu` extra installs and which otherwise prints 'unexpected worker hostname' lines before any output:
    jax's platforms become the others ("cuda,cpu": the first that starts). A platform list the user set
    (JAX_PLATFORMS) is left alone; compiling for TPU topologies (`aot`) needs no TPU backend."""
    import jax

    if jax.config.jax_platforms or glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
        return
    jax.config.update("jax_platforms", "cuda,cpu")


def claim_gpu_memory() -> None:
    """A GPU's memory for this process: 95% of it (XLA's default, 75%, leaves a 7B model's step at 8k
    tokens on one H200 34 GiB short of what it compiles for), unless XLA_PYTHON_CLIENT_MEM_FRACTION says."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")


def run(fn: Callable[[], int]) -> int:
    """fn's exit status; user errors become one line on stderr (see the module docstring)."""
    skip_absent_tpu()
    claim_gpu_memory()
    try:
        return fn()
    except SystemExit as e:  # argparse (--help, or its one-line refusal already printed), or a message
        if isinstance(e.code, str):
            return fail(e.code)
        return BAD_INPUT if e.code is None else e.code
    except RunError as e:
        return fail(str(e), FAILED)
    except ValueError as e:
        return fail(str(e))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return fail(os_message(e), FAILED)
        if e.errno in _OS_REASONS:
            return fail(os_message(e))
        raise
    except KeyboardInterrupt as e:
        print(f"error: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        return fail(f"out of device memory ({str(e).splitlines()[0][:200]}): the run's shapes do not fit; "
                    f"training: model.remat 'full' or 'offload' (layer inputs in host memory), a larger mesh.seq, "
                    f"more train.grad_accum; generation and eval: fewer prompts at once, or a mesh", FAILED)


def out_of_memory(e: BaseException) -> bool:
    """XLA's allocation failure (jax's JaxRuntimeError, by name: this module is imported before jax)."""
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and str(e).startswith("RESOURCE_EXHAUSTED")


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread while the block runs, as Ctrl-C does, so that
    clean-up (`finally`, `except BaseException`) runs and `run` prints one line."""
    def stop(signum, _frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows each argument's default (where it has one that
    its help does not already state)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS or "default" in text \
                or not action.option_strings:
            return text
        return f"{text} (default: {action.default})".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, its errors one line (`error: argument --x: ...`, exit status 2) instead of usage + error;
    --help with defaults (`HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(BAD_INPUT, f"error: {one_line(message)} (see --help)\n")


def count(minimum: int):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def check_writable(path: str | Path, flag: str) -> Path:
    """Checks, creating nothing, that directory `path` could be made and written (its nearest existing
    ancestor is a directory this process may write): a ValueError naming `flag` otherwise."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {path} is a file; expected a directory (it is created when missing)")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {path} is not writable ({ancestor} is "
                         + ("a file)" if not ancestor.is_dir() else "read-only)"))
    return path


def writable_dir(path: str | Path, flag: str) -> Path:
    """Creates directory `path` if needed and checks that it takes files: a ValueError naming `flag`
    otherwise (before any work whose results it is to hold)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {path} is a file; expected a directory (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: {path} is not writable ({e.strerror or e})") from None
    return path
