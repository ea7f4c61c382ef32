#!/usr/bin/env python3
"""Run yarn_jax on several GPU nodes with Slurm: one process per node, all its GPUs local to it.

    python launch/slurm_gpu.py --nodes 4 --gpus-per-node 8 --config configs/h200_1b.py --workdir /shared/run \
        [--partition P] [--time 24:00:00] [--dry-run] [-- --config.optim.lr=1e-5]

Writes the sbatch script next to the workdir and submits it; the trainer sees SLURM_NTASKS > 1 and calls
jax.distributed.initialize(), which reads the coordinator and process ids from Slurm. --dry-run prints
the script and the sbatch command instead.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def script(a) -> str:
    train = ["python", "-m", "yarn_jax.train", f"--config={a.config}", f"--workdir={a.workdir}", *a.train_args]
    lines = ["#!/bin/bash", f"#SBATCH --job-name={a.name}", f"#SBATCH --nodes={a.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={a.gpus_per_node}",
             f"#SBATCH --time={a.time}", f"#SBATCH --output={a.workdir}/slurm-%j.log"]
    if a.partition:
        lines.append(f"#SBATCH --partition={a.partition}")
    lines += ["set -euo pipefail", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
              f"srun --kill-on-bad-exit=1 {shlex.join(train)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="launch/slurm_gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="yarn_jax")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    a.train_args = extra
    text = script(a)
    path = Path(a.workdir) / f"{a.name}.sbatch"
    submit = ["sbatch", str(path)]
    if a.dry_run:
        print(f"# {path}\n{text}{shlex.join(submit)}")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return subprocess.run(submit).returncode


if __name__ == "__main__":
    sys.exit(main())
