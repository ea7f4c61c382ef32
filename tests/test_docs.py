"""Every command the README, docs/*.md, the configs' and the launchers' docstrings show: its flags parse
with the command's real parser, a run config it names loads with its overrides, and a CPU-sized run of
the same command lives in the test that COVERED names (a new command without one fails here)."""

import argparse
import importlib
import importlib.util
import re
import shlex

import pytest

from tests.train_helpers import ROOT
from yarn_jax import run_config

SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "launch").glob("*.py")),
           *sorted((ROOT / "configs").glob("*.py"))]
# (entry point, subcommand) -> the test that runs it CPU-sized (same subcommand and flags, smaller sizes)
E2E = "tests/test_tokenizer.py::test_a_run_keeps_its_tokenizer_and_every_command_uses_it"
COVERED = {
    ("yarn_jax.train", None): "tests/test_train.py::test_a_signal_saves_the_current_step_and_exits",
    ("yarn_jax.convert", "from-hf"): "tests/test_convert.py::test_cli_both_ways",
    ("yarn_jax.convert", "to-hf"): "tests/test_convert.py::test_cli_both_ways",
    ("yarn_jax.eval", "perplexity"): E2E,
    ("yarn_jax.eval", "passkey"): E2E,
    ("yarn_jax.generate", None): E2E,
    ("yarn_jax.aot", None): "tests/test_aot.py::test_tiny_config_compiles_and_fits_on_v4_8",
    ("yarn_jax.bench", "train-step"): "tests/test_bench.py::test_train_step_bench_prints_both_sides_and_the_ratio",
    ("yarn_jax.bench", "generate"): "tests/test_bench.py::test_generate_bench_times_ours_and_both_peers",
    ("yarn_jax.bench", "attention"): "tests/test_bench.py::test_attention_bench_reference_runs",
    ("yarn_jax.bench", "layer-ops"): "tests/test_bench.py::test_layer_ops_bench_checks_candidates_against_float32",
    ("yarn_jax.bench", "ring-memory"): "tests/test_bench.py::test_ring_memory_bench_runs_and_temporaries_fall",
    # parse only (the parse check below): their smallest run is minutes of CPU or needs a GPU
    ("yarn_jax.bench", "reproduce"): "parse only: --smoke pretrains and fine-tunes 7 models (minutes)",
    ("yarn_jax.bench", "convert"): "parse only: writes and reads a 7B-shaped checkpoint",
    ("yarn_jax.bench", "real-model"): "parse only: fine-tunes a 135M model four times (an H200's minutes); its "
                                      "parts: tests/test_real_model.py",
    ("yarn_jax.bench", "tpu-aot"): "parse only: compiles the paper's configs for several topologies",
    ("yarn_jax.bench", "profile"): "tests/test_bench.py::test_profile_decode_runs_to_its_trace",
    ("yarn_jax.bench", "mosaic-probe"): "tests/test_bench.py::test_mosaic_probe_records_every_kernel_it_tries",
    ("launch/tpu_pod.py", "up"): "tests/test_launch.py::test_tpu_pod_up_dry_run",
    ("launch/tpu_pod.py", "logs"): "tests/test_launch.py::test_tpu_pod_other_actions",
    ("launch/tpu_pod.py", "delete"): "tests/test_launch.py::test_tpu_pod_other_actions",
    ("launch/slurm_gpu.py", None): "tests/test_launch.py::test_slurm_dry_run",
}
SUBCOMMANDS = {"yarn_jax.convert", "yarn_jax.eval", "yarn_jax.bench", "launch/tpu_pod.py"}


def _lines(path):
    """Command lines of a file (backslash continuations joined): the lines of code blocks (fenced, or
    indented four spaces as in docstrings), and inline `python ...` that pass arguments, wrapped over
    lines or not (a bare `python -m yarn_jax.eval` in prose names a module, not a command)."""
    text = path.read_text().replace("\\\n", " ")
    prefixes = ("python -m yarn_jax", "python launch/")
    found, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.lstrip().startswith("```")
        if (fenced or line.startswith("    ")) and line.strip().startswith(prefixes):
            found.append(re.split(r"\s+#", line.strip())[0])
    paragraphs = re.sub(r"(?<!\n)\n(?!\n)", " ", text)  # one line each: an inline command may wrap
    found += re.findall(r"`(python (?:-m yarn_jax[^\s`]*|launch/[^\s`]+) [^`]+)`", paragraphs)
    return found


def commands():
    """(file, entry point, arguments) of every shown command; a synopsis's [optional] parts count as given."""
    out = []
    for path in SOURCES:
        for line in _lines(path):
            argv = shlex.split(line.replace("[", "").replace("]", ""))
            where, args = (argv[2], argv[3:]) if argv[1] == "-m" else (argv[1], argv[2:])
            out.append((path.relative_to(ROOT).as_posix(), where, args))
    return out


def _key(where, args):
    return where, args[0] if where in SUBCOMMANDS and args else None


def test_every_shown_command_is_covered_by_a_cpu_sized_run():
    found = commands()
    assert len(found) > 20, found  # the extraction works
    for path, where, args in found:
        key = _key(where, args)
        assert key in COVERED, f"{path}: `{where} {' '.join(args)}` has no CPU-sized run in COVERED"
    for test in {t for t in COVERED.values() if not t.startswith("parse only")}:
        file, name = test.split("::")
        assert re.search(rf"def {name}\(", (ROOT / file).read_text()), f"{test} does not exist"


PRODUCT = {"yarn_jax.train", "yarn_jax.convert", "yarn_jax.eval", "yarn_jax.generate", "yarn_jax.aot"}


def _subparsers(parser):
    return [sub for a in parser._actions if isinstance(a, argparse._SubParsersAction) for sub in a.choices.values()]


class _ParsedError(Exception):  # not an error: the parse went through, stop here
    pass


def _entry(where, args):
    if where.startswith("launch/"):
        spec = importlib.util.spec_from_file_location(where.replace("/", "_")[:-3], ROOT / where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main, args
    if where == "yarn_jax.bench":
        from yarn_jax.bench.__main__ import COMMANDS

        return importlib.import_module(f"yarn_jax.bench.{COMMANDS[args[0]]}").main, args[1:]
    module = importlib.import_module(where if where != "yarn_jax.eval" else "yarn_jax.eval.__main__")
    return (lambda a: module.main(["train", *a])) if where == "yarn_jax.train" else module.main, args


@pytest.mark.parametrize("path,where,args", commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_shown_command_parses_and_its_config_loads(path, where, args, monkeypatch):
    """The real parser takes every flag (a renamed or dropped flag fails); `--config` files load with the
    command's `--config.*` overrides. A line that elides arguments (`...`) is checked for coverage only."""
    if "..." in args:
        pytest.skip("elided arguments: covered by the COVERED check only")
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise _ParsedError(real(self, argv, namespace), self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main, argv = _entry(where, args)
    with pytest.raises(_ParsedError) as parsed:
        main(argv)
    if where in PRODUCT:  # --help says what every argument is
        parser = parsed.value.args[1]
        actions = [a for p in [parser, *_subparsers(parser)] for a in p._actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    config = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                   if a == "--config" or a.startswith("--config=")), None)
    if config and where != "launch/tpu_pod.py" and where != "launch/slurm_gpu.py":
        overrides, _ = run_config.split_overrides(args)
        run_config.load(str(ROOT / config), overrides)
