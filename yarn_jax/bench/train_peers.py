"""The peers of the train-step benchmark, each timed in its own process on the same device.

    peer(cfg, "hf-liger", seq=8192, steps=5, remat=False, compiled=False, clip=1.0)
        -> {"step_s", "peak_gib", "setting"} or {"error": one line}

Every peer trains the run config's model shape on `seq` random tokens (batch 1) with AdamW, the gradients
clipped to the run config's global norm (`optim.clip`, as ours; each peer's trainer clips at 1.0 by
default: transformers' `max_grad_norm`, torchtitan's `training.max_norm`, MaxText's
`gradient_clipping_threshold`), and the config's precision where it allows: `model.param_dtype` float32
-> float32 master weights and bf16 compute (torch autocast for transformers, FSDP's mixed-precision
policy for torchtitan, MaxText's `weight_dtype`); bfloat16 -> bf16 weights throughout. The exact setting
is the row's `setting`.

- hf-torch: `transformers.LlamaForCausalLM`, SDPA attention, fused AdamW, eager or `torch.compile`.
- hf-liger: the same after `liger_kernel.transformers.apply_liger_kernel_to_llama()` (fused RMSNorm,
  RoPE, SwiGLU, linear + cross-entropy).
- torchtitan (0.2.x: 0.3.0 needs torch >= 2.12, newer than the GPU image's 2.11): its Llama 3 model
  (the same parameter count as ours at the TinyLlama and Llama-2-7B shapes; Llama 3.1 RoPE scaling, as
  0.2.x has no YaRN: the same arithmetic on another frequency table), SDPA attention, op-level selective
  activation checkpointing (`remat`; its full AC where selective runs out of memory: its best setting that
  fits) or none, each block under `torch.compile`, FSDP2 on one device for
  the mixed precision, in the order its trainer applies them (`parallelize_llama`). Checked on CPU with
  torchtitan 0.2.2 on torch 2.11 and 2.13 (no AC, selective and full AC run; it imports triton and
  tensorboard); timed on an H200 and an H100 (`docs/performance.md`).
- maxtext (0.2.5): its trainer on synthetic data (`hardware=gpu`, `attention=cudnn_flash_jax`: jax's
  cuDNN flash attention, the kernel ours calls; the GPU image has no Transformer Engine), remat policy
  `full` with its layers scanned (its default) or, for the row without checkpointing,
  `minimal_with_context` (every projection's output and the attention output kept: the least
  recomputation it offers; its `none` is no policy, which `jax.checkpoint` reads as full recomputation)
  with its layers unrolled (`scan_layers=false`: 8% faster and 6.6 GiB less than scanned at 8k on an
  H100); the median of its logged step times. What it imports
  and the GPU image lacks (21 packages, 53 MB of wheels with MaxText's own) travels as wheels
  (`docs/performance.md` lists them).

A peer whose package is missing or that fails (out of memory, an import the device lacks) is a row with
the reason: never silently absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PEERS = ("hf-torch", "hf-liger", "torchtitan", "maxtext")
NEEDS = {"hf-torch": "transformers", "hf-liger": "liger_kernel", "torchtitan": "torchtitan", "maxtext": "maxtext"}

# argv: shape json, seq, remat 0/1, compiled 0/1, steps, name, param dtype, compute dtype, clip (0: none)
HF = r'''
import contextlib, json, statistics, sys, time, torch, transformers
shape, seq, steps = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[5])
remat, compiled, liger = sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[6] == "hf-liger"
param, compute, clip = getattr(torch, sys.argv[7]), getattr(torch, sys.argv[8]), float(sys.argv[9])
if liger:  # patches transformers' Llama classes: before the model is built
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    apply_liger_kernel_to_llama()
dev = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
cfg = transformers.LlamaConfig(**shape, attn_implementation="sdpa", torch_dtype=sys.argv[7])
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).to(dev, param)
if remat:
    model.gradient_checkpointing_enable()
opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=dev == "cuda")
forward = torch.compile(model) if compiled else model
autocast = (lambda: torch.autocast(dev, dtype=compute)) if compute != param else contextlib.nullcontext
x = torch.randint(0, shape["vocab_size"], (1, seq), device=dev)
times = []
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
for i in range(steps + 2):
    sync(); t = time.perf_counter()
    with autocast():
        loss = forward(input_ids=x, labels=x).loss
    loss.backward()
    if clip > 0:  # as transformers' Trainer does (max_grad_norm)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step(); opt.zero_grad(set_to_none=True)
    sync()
    if i >= 2: times.append(time.perf_counter() - t)
peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
setting = (f"{sys.argv[7]} weights" + (f", {sys.argv[8]} autocast" if compute != param else "") + ", SDPA"
           + (", torch.compile" if compiled else ", eager") + (", checkpointing" if remat else ""))
print(json.dumps({"step_s": statistics.median(times), "peak_gib": peak, "setting": setting}))
'''

# argv: shape json, seq, AC mode (none, selective, full), steps, param dtype, compute dtype, rope json,
# clip (0: none) (torchtitan 0.2.x)
TITAN = r'''
import importlib.util, json, os, statistics, sys, time, types, torch
def stand_in(attr):  # any public name of a module the image lacks: an empty class
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})
for top, sub in (("datasets", "distributed"), ("torchdata", "stateful_dataloader")):
    # its llama3 package imports its data loaders, which the peer never builds: a stand-in where one is missing
    if importlib.util.find_spec(top) is None:
        for name in (top, f"{top}.{sub}"):
            sys.modules[name] = stub = types.ModuleType(name)
            stub.__getattr__ = stand_in
import torchtitan
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torchtitan.config.job_config import ActivationCheckpoint, Compile
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list, apply_compile, apply_fsdp
from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs
from torchtitan.models.llama3.model.model import Transformer
shape, seq, ac, steps = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
param, compute, rope = getattr(torch, sys.argv[5]), getattr(torch, sys.argv[6]), json.loads(sys.argv[7])
clip = float(sys.argv[8])
d, f, heads = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"]
if int(8 * d / 3) > f or d // heads != shape["head_dim"]:  # its FFN width: 8d/3 rounded up to multiple_of
    print(json.dumps({"error": f"torchtitan's Llama 3 cannot take this shape (d {d}, FFN {f}, head dim "
                               f"{shape['head_dim']})"})); sys.exit()
dev = "cuda" if torch.cuda.is_available() else "cpu"
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29517")
dist.init_process_group("nccl" if dev == "cuda" else "gloo", rank=0, world_size=1)
args = TransformerModelArgs(
    dim=d, n_layers=shape["num_hidden_layers"], n_heads=heads, n_kv_heads=shape["num_key_value_heads"],
    vocab_size=shape["vocab_size"], multiple_of=f, ffn_dim_multiplier=None, rope_theta=rope["theta"],
    rope_scaling_args=RoPEScalingArgs(scaling_factor=rope["factor"], original_max_position_embeddings=rope["original"]),
    max_seq_len=seq, attn_type="sdpa")
with torch.device("meta"):
    model = Transformer(args)
model.to_empty(device=dev)
with torch.no_grad():
    model.init_weights(buffer_device=torch.device(dev))
model = model.to(param)
if ac != "none":  # as its trainer applies them: activation checkpointing, then per-block compile, then FSDP
    apply_ac(model, ActivationCheckpoint(mode=ac, selective_ac_option="op"), model_compile_enabled=True,
             op_sac_save_list=_op_sac_save_list, base_folder="/tmp")
apply_compile(model, Compile(enable=True))
apply_fsdp(model, init_device_mesh(dev, (1,)), param_dtype=compute, reduce_dtype=torch.float32, pp_enabled=False)
opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=dev == "cuda")
loss_fn = torch.compile(lambda logits, y: torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()))
x = torch.randint(0, shape["vocab_size"], (1, seq + 1), device=dev)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
times = []
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
for i in range(steps + 2):
    sync(); t = time.perf_counter()
    loss = loss_fn(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    if clip > 0:  # as its trainer does (training.max_norm; its clip_grad_norm_ is torch's without pipeline stages)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    opt.step(); opt.zero_grad(set_to_none=True)
    sync()
    if i >= 2: times.append(time.perf_counter() - t)
setting = (f"torchtitan {torchtitan.__version__}, {sys.argv[5]} weights, {sys.argv[6]} compute (FSDP policy), "
           f"Llama 3.1 RoPE scaling, SDPA, per-block torch.compile" + (f", {ac} AC" if ac != "none" else ""))
print(json.dumps({"step_s": statistics.median(times),
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0,
                  "setting": setting}))
'''


def _shape(cfg, seq: int) -> dict:
    """transformers' LlamaConfig keys of model `cfg` (a LlamaConfig) taking `seq` tokens."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=max(seq, cfg.max_position_embeddings))


def dtypes(cfg) -> tuple[str, str]:
    """(parameter, compute) dtype names of model `cfg`."""
    import numpy as np

    return np.dtype(cfg.execution.param_dtype).name, np.dtype(cfg.execution.dtype).name


def _last_json(r: subprocess.CompletedProcess) -> dict:
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# argv: MaxText's base.yml, then its key=value settings; prints the process's peak device memory last
MAXTEXT = r'''
import json, sys
import jax
from maxtext.trainers.pre_train import train
train.main(["train", *sys.argv[1:]])
print(json.dumps({"peak_gib": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30}))
'''


def _maxtext(cfg, seq: int, steps: int, remat: bool, clip: float) -> dict:
    """MaxText's own trainer for `steps` + 2 steps; the median step time it logs after the first two and
    the process's peak device memory."""
    try:
        import maxtext
    except ImportError as e:
        return {"error": f"maxtext not importable: {e}"[:200]}
    param, compute = dtypes(cfg)
    base = Path(maxtext.__file__).parent / "configs" / "base.yml"
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.txt"
        # one process: no jax.distributed (MaxText's GPU path would otherwise want a cluster's env)
        args = dict(run_name="peer", base_output_directory=tmp, hardware="gpu", skip_jax_distributed_system="true",
                    dataset_type="synthetic", steps=steps + 2, enable_checkpointing="false",
                    per_device_batch_size=1, max_target_length=seq,
                    base_emb_dim=cfg.hidden_size, base_num_query_heads=cfg.num_heads,
                    base_num_kv_heads=cfg.num_kv_heads, base_mlp_dim=cfg.intermediate_size,
                    base_num_decoder_layers=cfg.num_layers, head_dim=cfg.head_dim,
                    vocab_size=cfg.vocab_size, dtype=compute, weight_dtype=param, attention="cudnn_flash_jax",
                    remat_policy="full" if remat else "minimal_with_context", scan_layers="true" if remat else "false",
                    gradient_clipping_threshold=clip, metrics_file=str(metrics), log_period=1)
        r = subprocess.run([sys.executable, "-c", MAXTEXT, str(base), *(f"{k}={v}" for k, v in args.items())],
                           capture_output=True, text=True, env={**os.environ, "DECOUPLE_GCLOUD": "TRUE"})
        if r.returncode or not metrics.exists():
            tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()] or ["no metrics written"]
            return {"error": tail[-1][:200]}
        times = [json.loads(ln)["perf/step_time_seconds"] for ln in metrics.read_text().splitlines()
                 if "perf/step_time_seconds" in ln][2:]
    if not times:
        return {"error": "maxtext logged no step times"}
    times.sort()
    setting = (f"{param} weights, {compute} compute, cuDNN attention (cudnn_flash_jax), remat {args['remat_policy']}, "
               f"{'scanned' if remat else 'unrolled'} layers")
    return {"step_s": times[len(times) // 2], **_last_json(r), "setting": setting}


def clipping(clip: float) -> str:
    """What a row's `setting` says of the gradients' global-norm bound `clip` (0: none)."""
    return f", clip {clip:g}" if clip > 0 else ""


def peer(cfg, name: str, seq: int, steps: int, remat: bool, compiled: bool, clip: float) -> dict:
    """One peer's timing of model `cfg` (a LlamaConfig) at `seq` tokens in its own process, or {"error":
    the reason it did not run}. `compiled` (torch.compile) is for the transformers peers only; `clip`: the
    gradients' global-norm bound (0: none)."""
    needs = NEEDS[name]  # absent: a row with the reason, without starting a process
    if needs not in sys.modules and importlib.util.find_spec(needs) is None:
        return {"error": f"{needs} not installed"}
    r = (_maxtext(cfg, seq, steps, remat, clip) if name == "maxtext"
         else _torch(cfg, name, seq, steps, remat, compiled, clip))
    if "setting" in r:
        r["setting"] += clipping(clip)
    return r


def _torch(cfg, name: str, seq: int, steps: int, remat: bool, compiled: bool, clip: float) -> dict:
    """`peer` for the PyTorch peers (transformers, Liger, torchtitan): their scripts in a subprocess."""
    param, compute = dtypes(cfg)
    shape = _shape(cfg, seq)
    if name == "torchtitan":
        scaling = cfg.rope_scaling  # YaRN's factor and trained length, for torchtitan's Llama 3.1 scaling
        rope = {"theta": cfg.rope_theta, "factor": getattr(scaling, "factor", 1.0),
                "original": getattr(scaling, "original_max_position_embeddings", cfg.max_position_embeddings)}
        def run(ac: str) -> dict:
            argv = [json.dumps(shape), str(seq), ac, str(steps), param, compute, json.dumps(rope), str(clip)]
            return _script(TITAN, argv)
        r = run("selective" if remat else "none")
        if not remat or "out of memory" not in r.get("error", "").lower():
            return r
        r = {**run("full"), "remat": "full"}  # its trainer's other mode: the best setting that fits
        if "setting" in r:
            r["setting"] += " (selective AC out of memory)"
        return r
    argv = [json.dumps(shape), str(seq), "1" if remat else "0", "1" if compiled else "0", str(steps), name,
            param, compute, str(clip)]
    return _script(HF, argv)


def _script(script: str, argv: list[str]) -> dict:
    """A peer script run in its own Python process: its last JSON line, or {"error": its last stderr line}."""
    return _last_json(subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True))
