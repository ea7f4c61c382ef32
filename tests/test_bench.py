"""The train-step benchmark end to end on CPU with a tiny config: both sides and the kernel bound run,
the table and the ratios are printed and the rows are written."""

import json

import numpy as np
import pytest

from tests.train_helpers import ROOT
from yarn_jax.bench import train_step_bench


def test_train_step_bench_prints_both_sides_and_the_ratio(tmp_path, capsys):
    """transformers, transformers + Liger, torchtitan and MaxText (a row with its reason where one cannot
    run, as Liger's kernels and the absent torchtitan / MaxText on this CPU), ours and the kernel bound,
    each with its setting in the config's precision; the comparison names the fastest peer that ran."""
    out = tmp_path / "rows.json"
    assert train_step_bench.main(["--config", "configs/tiny.py", "--seq", "64", "--steps", "1", "--peer",
                                  "hf-torch,hf-liger,torchtitan,maxtext", "--set", "model.scan_unroll=2", "--bound",
                                  "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["remat"]) for r in rows] == [
        ("hf-torch", "none"), ("hf-torch", "full"), ("hf-liger", "none"), ("hf-liger", "full"),
        ("torchtitan", "none"), ("torchtitan", "selective"), ("maxtext", "minimal_with_context"), ("maxtext", "full"),
        ("yarn_jax", "none"), ("kernel bound", "-")]
    assert all(r["step_s"] > 0 for r in rows[:2] + rows[8:]), rows
    assert all(r.get("step_s", 0) > 0 or r["error"] for r in rows[2:8]), rows  # timed, or the reason it was not
    # configs/tiny.py computes in float32: the peer too, without autocast; it clips as ours (optim.clip)
    assert rows[0]["setting"] == "float32 weights, SDPA, eager, clip 1"
    assert rows[1]["setting"] == "float32 weights, SDPA, eager, checkpointing, clip 1"
    assert rows[8]["setting"] == "float32 weights, float32 compute, auto attention, clip 1"
    assert rows[8]["program_gib"] > 0 and rows[8]["host_gib"] == 0  # host memory: remat offload only
    assert rows[9]["matmul_tflops"] > 0 and rows[9]["attention_layer_s"] > 0
    printed = capsys.readouterr().out
    ran = [r for r in rows[:8] if "step_s" in r]
    best = max(ran, key=lambda r: 64 / r["step_s"])
    ours, peer, bound = (64 / r["step_s"] for r in (rows[8], best, rows[9]))
    assert (f"| 64 | {ours:,.0f} | {best['impl']} | {peer:,.0f} | {ours / peer:.2f}x | {ours / bound:.2f}x | "
            f"{bound / peer:.2f}x |" in printed)


def test_train_step_bench_compile_only_reports_the_programs_memory(tmp_path, capsys):
    """`--compile-only`: ours compiled from abstract inputs, not run: the row has the program's memory and
    no time; with a peer it is refused in one line."""
    out = tmp_path / "rows.json"
    argv = ["--config", "configs/tiny.py", "--seq", "64", "--compile-only", "--set", "model.scan_unroll=2"]
    assert train_step_bench.main([*argv, "--out", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert row["impl"] == "yarn_jax" and row["program_gib"] > 0 and "step_s" not in row and "peak_gib" not in row
    assert f"| yarn_jax | 64 | none | - | - | - | {row['program_gib']:.1f} |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_step_bench.main([*argv, "--peer", "maxtext"])
    assert "--compile-only: compiles ours only" in capsys.readouterr().err


def test_train_step_bench_times_packed_documents(tmp_path, capsys):
    """`--documents 3`: ours on rows of three documents (positions restart, attention stays inside each),
    so its loss differs from one document's on the same tokens; with a peer it is refused in one line."""
    losses = []
    for documents in ("0", "3"):
        out = tmp_path / f"rows{documents}.json"
        argv = ["--config", "configs/tiny.py", "--seq", "64", "--steps", "1", "--documents", documents]
        assert train_step_bench.main([*argv, "--out", str(out)]) == 0
        [row] = json.loads(out.read_text())
        losses.append(row["loss"])
    assert row["impl"] == "yarn_jax (3 documents a row)" and np.isfinite(losses).all() and losses[0] != losses[1]
    with pytest.raises(SystemExit):
        train_step_bench.main([*argv, "--peer", "hf-torch"])
    assert "--documents: times ours only" in capsys.readouterr().err


def test_train_step_bench_runs_only_the_peer_settings_asked_for(tmp_path, capsys):
    """`--peer-checkpointing without` / `with`: each peer's one setting (MaxText, absent here, is a row with
    its reason), then ours, whose setting names its clipping (none with optim.clip=0); an unknown choice is
    one line."""
    out = tmp_path / "rows.json"
    argv = ["--config", "configs/tiny.py", "--seq", "64", "--steps", "1", "--peer", "maxtext,torchtitan",
            "--set", "model.scan_unroll=2", "--out", str(out)]
    for choice, want, clip in (("without", ("minimal_with_context", "none"), "1"),
                               ("with", ("full", "selective"), "0")):
        assert train_step_bench.main([*argv, "--peer-checkpointing", choice, f"--config.optim.clip={clip}"]) == 0
        rows = json.loads(out.read_text())
        assert [(r["impl"], r["remat"]) for r in rows] == [("maxtext", want[0]), ("torchtitan", want[1]),
                                                           ("yarn_jax", "none")]
        assert rows[2]["setting"].endswith("auto attention, clip 1" if clip == "1" else "auto attention")
    with pytest.raises(SystemExit):
        train_step_bench.main([*argv, "--peer-checkpointing", "never"])
    assert "--peer-checkpointing: invalid choice" in capsys.readouterr().err


def test_peers_keep_the_precision_of_the_run_config():
    """float32 master weights (the trainer's default) -> the transformers peer trains float32 weights
    under bf16 autocast, torchtitan through FSDP's bf16 policy, MaxText with weight_dtype float32;
    bf16 weights -> bf16 throughout."""
    from yarn_jax import run_config
    from yarn_jax.bench import train_peers

    for overrides, want in (([], ("float32", "bfloat16")), (["model.param_dtype=bfloat16"], ("bfloat16", "bfloat16"))):
        cfg, _ = run_config.model_config(run_config.load(str(ROOT / "configs/h200_1b.py"), overrides))
        assert train_peers.dtypes(cfg) == want
    assert train_peers._shape(cfg, 131072)["max_position_embeddings"] == 131072


def test_torchtitan_peer_falls_back_to_full_ac_when_selective_runs_out_of_memory(monkeypatch):
    """With checkpointing, torchtitan runs its trainer's default (op-level selective AC); out of memory,
    its full AC, the row saying so; any other failure, or none, is the row as it came."""
    import subprocess
    import sys
    import types

    from yarn_jax import run_config
    from yarn_jax.bench import train_peers

    cfg, _ = run_config.model_config(run_config.load(str(ROOT / "configs/tiny.py"), []))
    monkeypatch.setitem(sys.modules, "torchtitan", types.ModuleType("torchtitan"))
    for selective, want_modes, want in (
            ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.81 GiB", ["selective", "full"],
             {"remat": "full", "setting": "titan, full AC (selective AC out of memory), clip 1"}),
            ("ImportError: no module", ["selective"], {"error": "[rank0]: ImportError: no module"}),
            (None, ["selective"], {"setting": "titan, selective AC, clip 1"})):
        modes = []

        def fake(argv, selective=selective, modes=modes, **_):
            ac = argv[5]  # python -c TITAN shape seq AC ...
            modes.append(ac)
            if ac == "selective" and selective:
                return subprocess.CompletedProcess(argv, 1, "", f"[rank0]: {selective}\n")
            return subprocess.CompletedProcess(argv, 0, json.dumps({"step_s": 1.0, "peak_gib": 1.0,
                                                                    "setting": f"titan, {ac} AC"}), "")
        monkeypatch.setattr(train_peers.subprocess, "run", fake)
        r = train_peers.peer(cfg, "torchtitan", 64, 1, remat=True, compiled=False, clip=1.0)
        assert modes == want_modes
        assert {k: r[k] for k in want} == want, r
    r = train_peers.peer(cfg, "torchtitan", 64, 1, remat=False, compiled=False, clip=0.0)  # without: no fallback
    assert modes[-1] == "none" and r["setting"] == "titan, none AC" and "remat" not in r


def test_torchtitan_peer_stands_in_for_missing_data_loader_packages():
    """torchtitan's llama3 package imports its data loaders (datasets, torchdata), which the peer never
    builds and a GPU image may lack: its script's prelude puts stand-ins there, whose names import, can be
    subclassed beside an ABC, and have no dunder attributes (tools that walk sys.modules read __file__)."""
    import subprocess
    import sys

    from yarn_jax.bench import train_peers

    prelude = train_peers.TITAN.split("import torchtitan")[0]
    probe = prelude.replace("importlib.util.find_spec(top) is None", "True") + """
from abc import ABC
from datasets import Dataset, load_dataset
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader
class Loader(StatefulDataLoader, ABC): pass
assert all(getattr(sys.modules[m], "__file__", None) is None for m in ("datasets", "torchdata.stateful_dataloader"))
print(Loader.__mro__[1].__name__, load_dataset.__name__, split_dataset_by_node.__name__)
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["StatefulDataLoader", "load_dataset", "split_dataset_by_node"]


def test_profile_decode_runs_to_its_trace(capsys):
    """`bench profile --decode` prefills and runs the device loop under the profiler; on CPU the trace
    holds no GPU kernels, which it says in one line. Kernel names are summed without XLA's numbering."""
    from yarn_jax import cli
    from yarn_jax.bench import profile_step

    argv = ["--config", "configs/tiny.py", "--decode", "--seq", "40", "--steps", "1", "--sequence", "14"]
    assert cli.run(lambda: profile_step.main(argv)) == cli.FAILED
    assert "no GPU stream kernels (cpu: profiles need a GPU)" in capsys.readouterr().err
    assert [profile_step.stem(k) for k in ("loop_add_fusion_20", "gemm_fusion_dot.287", "memcpy128")] == [
        "loop_add_fusion", "gemm_fusion_dot", "memcpy128"]


def test_profile_sequence_gives_kernels_in_order_with_the_idle_time_before_each():
    from yarn_jax.bench import profile_step

    events = [(0, 1000, "a"), (1500, 2000, "b"), (3600, 400, "c"), (4000, 1000, "d"), (9000, 10, "e")]
    assert profile_step.sequence(events, 2) == [{"kernel": "c", "us": 0.4, "gap_us": 0.1},
                                                {"kernel": "d", "us": 1.0, "gap_us": 0.0}]
    assert profile_step.sequence(events, 0) == []


def test_mosaic_probe_records_every_kernel_it_tries(tmp_path):
    """On CPU neither cuDNN nor Mosaic GPU exists: every attempt must come back as a row with its error,
    and the file must be written (on a GPU the same rows carry times)."""
    from yarn_jax.bench import mosaic_probe

    out = tmp_path / "probe.json"
    assert mosaic_probe.main(["--seq", "128", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # per mask: cuDNN fwd and fwd+bwd, Mosaic fwd at 4 block shapes x 2 dtypes; then Mosaic fwd+bwd 2 x 2
    assert len(rows) == 2 * (2 + 4 * 2) + 2 * 2
    assert all(("ms" in r) != ("error" in r) for r in rows)


def test_attention_bench_times_a_ring_devices_work_and_checks_the_ring_against_the_reference(tmp_path):
    """Per ring size: the single-device kernel at T / R tokens, then the first and last device's ring work
    (timed rows); the ring over the 8 fake devices within 2e-2 of the float32 reference (the exit code)."""
    from yarn_jax.bench import attention_bench

    out = tmp_path / "ring.json"
    assert attention_bench.main(["--impl", "ring", "--seq", "512", "--ring", "4", "--heads", "4", "--kv-heads", "2",
                                 "--head-dim", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and 0 < result["rel_err"] < 2e-2
    assert [(r["ring"], r["device"]) for r in result["rows"]] == [(4, "single"), (4, 0), (4, 3)]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in result["rows"])


def test_generate_bench_times_ours_and_both_peers(tmp_path):
    """Two prompts of 32 tokens at once: ours and transformers eager and compiled (static cache) each
    time a prefill and decode steps; the floor is there only on devices whose bandwidth is known."""
    from yarn_jax.bench import generate_bench

    out = tmp_path / "gen.json"
    assert generate_bench.main(["--config", "configs/tiny.py", "--prompt", "32", "--batch", "2", "--new", "2",
                                "--peer", "hf-torch,hf-compile", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["hf-torch", "hf-compile", "yarn_jax"], rows
    assert all(r["prefill_s"] > 0 and r["decode_s"] > 0 and r["batch"] == 2 for r in rows), rows
    assert rows[-1]["floor_s"] is None  # CPU: no bandwidth listed


def test_ring_memory_bench_runs_and_temporaries_fall(tmp_path):
    from yarn_jax.bench import ring_memory

    out = tmp_path / "ring_memory.json"
    assert ring_memory.main(["--seq-len", "512", "--rings", "1,2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["ring"] for r in rows] == [1, 2]
    assert rows[-1]["temp_mib"] < rows[0]["temp_mib"] * 0.75, rows


def test_attention_bench_reference_runs(tmp_path):
    from yarn_jax.bench import attention_bench

    out = tmp_path / "attention.json"
    assert attention_bench.main(["--impl", "reference", "--seq", "128", "--heads", "2", "--kv-heads", "2",
                                 "--head-dim", "16", "--out", str(out)]) == 0
    assert out.exists()


def test_attention_bench_times_packed_documents_and_checks_them_against_the_float32_reference(tmp_path):
    """--documents: segment ids of d equal documents a row, each timed (FLOPs over d) and checked forward and
    backward (here the bf16 reference against the float32 one: small, not zero)."""
    from yarn_jax.bench import attention_bench

    out = tmp_path / "attention.json"
    assert attention_bench.main(["--impl", "reference", "--seq", "128", "--heads", "2", "--kv-heads", "2",
                                 "--head-dim", "16", "--documents", "1,4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["documents"] for r in result["rows"]] == [1, 4] and 0 < result["rel_err"] < 2e-2


def test_attention_bench_checks_and_times_candidate_kernels(tmp_path, capsys):
    """A candidate kernel (tokamax's XLA form and jax's Pallas Triton kernel, interpreted, run on CPU) is
    checked forward and backward against the float32 reference before it is timed; one that cannot run on
    this platform fails in one line."""
    import jax

    from yarn_jax import cli
    from yarn_jax.bench import attention_bench

    out = tmp_path / "attention.json"
    args = ["--seq", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--out", str(out)]
    assert cli.run(lambda: attention_bench.main(["--impl", "tokamax-xla", *args])) == 0
    got = json.loads(out.read_text())
    assert 0 < got["rel_err"] < 2e-2 and got["rows"][0]["fwd_bwd_ms"] > 0
    assert cli.run(lambda: attention_bench.main(["--impl", "pallas-triton", *args])) == 0
    got = json.loads(out.read_text())
    assert got["impl"] == "pallas-triton" and 0 < got["rel_err"] < 2e-2
    assert cli.run(lambda: attention_bench.main(["--impl", "tokamax-mosaic", *args])) == cli.FAILED
    assert cli.run(lambda: attention_bench.main(["--impl", "tokamax-flash", *args])) == cli.BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --impl tokamax-mosaic does not run on cpu (jax "
                   f"{jax.__version__}): NotImplementedError: Not supported on cpu.",
                   "error: --impl tokamax-flash: expected a kernel (cudnn, splash, reference), ring, or one of "
                   "tokamax-mosaic, tokamax-triton, tokamax-cudnn, tokamax-xla, tokamax-xla_chunked, pallas-triton, "
                   "pallas-mgpu"]


def test_layer_ops_bench_checks_candidates_against_float32(tmp_path, capsys):
    """SwiGLU and RMSNorm, ours and tokamax's: each computes the float32 function within bf16 rounding,
    forward and backward, and is timed; a kernel this platform lacks is a row with its reason."""
    from yarn_jax import cli
    from yarn_jax.bench import layer_ops

    out = tmp_path / "layer_ops.json"
    args = ["--config", str(ROOT / "configs/tiny.py"), "--seq", "64", "--out", str(out)]
    assert layer_ops.main([*args, "--impl", "xla,tokamax-xla,tokamax-mosaic"]) == 0
    rows = {(r["op"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("swiglu", "xla"), ("swiglu", "tokamax-xla"), ("swiglu", "tokamax-mosaic"),
                         ("rmsnorm", "xla"), ("rmsnorm", "tokamax-xla")}
    for key in (("swiglu", "xla"), ("swiglu", "tokamax-xla"), ("rmsnorm", "xla"), ("rmsnorm", "tokamax-xla")):
        assert 0 < rows[key]["rel_err"] < 2e-2 and rows[key]["fwd_bwd_ms"] > 0, rows[key]
    assert rows["swiglu", "tokamax-mosaic"]["error"] == "NotImplementedError: Not supported on cpu."
    assert cli.run(lambda: layer_ops.main([*args, "--impl", "xla,tokamax-cuda"])) == cli.BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --impl: expected a comma list of tokamax-mosaic, tokamax-triton, tokamax-xla, xla, got 'tokamax-cuda'")


def test_bench_command_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import os
    import runpy
    import subprocess
    import sys

    from yarn_jax import cli

    monkeypatch.setattr(sys, "argv", ["python -m yarn_jax.bench", "trainstep"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("yarn_jax.bench", run_name="__main__")
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: COMMAND: expected one of ['convert', 'ring-memory', 'attention', 'train-step', 'reproduce', "
        "'tpu-aot', 'profile', 'mosaic-probe', 'generate', 'real-model', 'layer-ops'], got 'trainstep' (did you mean "
        "'train-step'?)")
    assert cli.run(lambda: train_step_bench.main(["--seq", "abc"])) == 2
    assert capsys.readouterr().err.startswith("error: argument --seq: expected comma-separated positive integers")
    # in a process of its own with JAX_PLATFORMS unset and the `tpu` extra installed: on a host without TPU
    # chips no libtpu lines come before ours (the backend starts before the config error is found)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run([sys.executable, "-m", "yarn_jax.bench", "train-step", "--config", "configs/tiny.py",
                          "--seq", "100000", "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: train.loss_chunk: expected a divisor of seq_len (100000), got 256"], run.stderr
    assert not (tmp_path / "x.json").exists()


def test_profile_names_each_fusion_by_the_model_operation_it_comes_from():
    """A kernel named as its fusion (`.N` as `_N`) maps to the op_name of its HLO instruction, the outer
    jit and the layer numbers dropped; library kernels map to nothing."""
    from yarn_jax.bench import profile_step

    hlo = ('  %input_add_reduce_fusion.85 = (f32[8192]{0}) fusion(%p.1), kind=kInput, calls=%fused_add_reduce.85, '
           'metadata={op_name="jit(step)/jvp(Llama)/eval_jaxpr/layers_3/attn_norm/reduce_sum" stack_frame_id=1}\n'
           '  ROOT %loop_add_fusion = f32[2048]{0} fusion(%a, %b), kind=kLoop, calls=%fused_add, '
           'metadata={op_name="jit(step)/add"}\n')
    names = profile_step.op_names(hlo)
    norm = "jvp(Llama)/eval_jaxpr/layers/attn_norm/reduce_sum"
    assert profile_step.op_of("input_add_reduce_fusion_85", names) == norm
    assert profile_step.op_of("loop_add_fusion", names) == "add"
    assert profile_step.op_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", names) is None
    events = [(0, 5, "input_add_reduce_fusion_85"), (9, 7, "loop_add_fusion"), (20, 3, "input_add_reduce_fusion_85"),
              (30, 100, "nvjet_sm90_tst_256x128"), (40, 2, "loop_convert_fusion_9")]
    assert profile_step.fusions_by_op(events, hlo) == {norm: 8, "add": 7, "(loop_convert_fusion)": 2}
