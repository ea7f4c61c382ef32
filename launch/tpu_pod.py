#!/usr/bin/env python3
"""Run yarn_jax on a Cloud TPU pod slice: create -> install -> train -> logs -> copy -> delete.

    python launch/tpu_pod.py up --name yarn --zone us-central2-b --project P --accelerator v4-32 \
        --config configs/v4_64k.py --workdir gs://B/runs/yarn_64k -- --config.init_from=gs://B/ckpt
    python launch/tpu_pod.py logs --name yarn --zone us-central2-b --project P [--dry-run]

(`copy` and `delete` take the same flags as `logs`.)

Every worker runs the same `python -m yarn_jax.train` at once; the trainer calls
jax.distributed.initialize() itself on a multi-host slice, and Orbax writes checkpoints to gs:// directly.
--dry-run prints the exact commands instead of running them.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

RUNTIME = "tpu-ubuntu2204-base"


def _ssh(a, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, f"--zone={a.zone}", f"--project={a.project}",
            f"--worker={worker}", f"--command={command}"]


def commands(a) -> list[list[str]]:
    create = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}",
              f"--zone={a.zone}", f"--project={a.project}", f"--accelerator-type={a.accelerator}",
              f"--runtime-version={a.runtime}"] + (["--spot"] if a.spot else [])
    wait = ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name, f"--zone={a.zone}",
            f"--project={a.project}", "--format=value(state.state)"]
    install = _ssh(a, f"pip install -U {shlex.quote(a.package)}")
    train = ["python", "-m", "yarn_jax.train", f"--config={a.config}", f"--workdir={a.workdir}", *a.train_args]
    run = _ssh(a, f"nohup {shlex.join(train)} > ~/yarn_train.log 2>&1 &")
    logs = _ssh(a, "tail -n 200 -f ~/yarn_train.log", worker="0")
    copy = ["gcloud", "storage", "cp", "-r", f"{a.workdir.rstrip('/')}/checkpoints", a.dest]
    delete = ["gcloud", "compute", "tpus", "queued-resources", "delete", a.name, f"--zone={a.zone}",
              f"--project={a.project}", "--force", "--quiet"]
    return {"up": [create, wait, install, run], "logs": [logs], "copy": [copy], "delete": [delete]}[a.action]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "logs", "copy", "delete"])
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--accelerator", default="v4-32")
    p.add_argument("--runtime", default=RUNTIME)
    p.add_argument("--spot", action="store_true")
    p.add_argument("--package", default="yarn_jax[tpu] @ git+https://github.com/OWNER/yarn_jax",
                   help="what every worker pip-installs (a git URL or a gs:// wheel)")
    p.add_argument("--config", default="configs/v4_64k.py")
    p.add_argument("--workdir", default="gs://BUCKET/runs/yarn")
    p.add_argument("--dest", default="./checkpoints", help="where `copy` puts the checkpoints")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    a.train_args = extra
    for cmd in commands(a):
        print(shlex.join(cmd), flush=True)
        if a.dry_run:
            continue
        if cmd[3:5] == ["queued-resources", "describe"]:
            _wait_active(cmd)
            continue
        subprocess.run(cmd, check=True)
    return 0


def _wait_active(describe: list[str], timeout_s: int = 3600) -> None:
    import time

    start = time.time()
    while time.time() - start < timeout_s:
        state = subprocess.run(describe, check=True, capture_output=True, text=True).stdout.strip()
        if state == "ACTIVE":
            return
        time.sleep(30)
    raise SystemExit(f"queued resource not ACTIVE after {timeout_s} s")


if __name__ == "__main__":
    sys.exit(main())
