"""Launch scripts: the dry runs print the exact commands a user would run."""

import importlib.util
import shlex

from tests.train_helpers import ROOT


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tpu_pod_up_dry_run(capsys):
    tpu = _load("tpu_pod")
    assert tpu.main(["up", "--name", "yarn", "--zone", "us-central2-b", "--project", "p", "--accelerator", "v4-128",
                     "--config", "configs/v4_64k.py", "--workdir", "gs://b/run", "--dry-run", "--",
                     "--config.init_from=gs://b/ckpt"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "yarn"]
    assert "--accelerator-type=v4-128" in lines[0]
    assert lines[2][-1].startswith("--command=pip install -U") and "--worker=all" in lines[2]
    run = lines[3][-1]
    assert "--worker=all" in lines[3] and "python -m yarn_jax.train --config=configs/v4_64k.py" in run
    assert "--workdir=gs://b/run --config.init_from=gs://b/ckpt" in run


def test_tpu_pod_other_actions(capsys):
    tpu = _load("tpu_pod")
    base = ["--name", "yarn", "--zone", "z", "--project", "p", "--workdir", "gs://b/run", "--dry-run"]
    for action, words in [("logs", ["--worker=0", "--command=tail -n 200 -f ~/yarn_train.log"]),
                          ("copy", ["gcloud", "storage", "cp", "-r", "gs://b/run/checkpoints"]),
                          ("delete", ["queued-resources", "delete", "yarn", "--force"])]:
        tpu.main([action, *base])
        out = shlex.split(capsys.readouterr().out)
        assert all(w in out for w in words), (action, out)


def test_slurm_dry_run(capsys):
    slurm = _load("slurm_gpu")
    assert slurm.main(["--nodes", "4", "--gpus-per-node", "8", "--config", "configs/h200_1b.py", "--workdir",
                       "/shared/run", "--dry-run", "--", "--config.optim.lr=1e-5"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --gpus-per-node=8" in out
    assert ("srun --kill-on-bad-exit=1 python -m yarn_jax.train --config=configs/h200_1b.py --workdir=/shared/run "
            "--config.optim.lr=1e-5") in out
    assert out.strip().endswith("sbatch /shared/run/yarn_jax.sbatch")
