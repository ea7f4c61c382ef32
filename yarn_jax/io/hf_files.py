"""Hugging Face checkpoint files, read and written one tensor at a time.

safetensors is read through its header and `np.memmap` (zero copy, bfloat16 via ml_dtypes, so a 13.5 GB
model never sits in memory) and written by streaming each tensor into a pre-planned shard. `.bin` files go
through `torch.load(mmap=True)` (torch is needed only for them).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
# buffers that old transformers versions saved with the weights; never parameters
_BUFFERS = ("rotary_emb.inv_freq",)


class SafetensorsFile:
    """Header of one .safetensors file; `get(name)` memory-maps a tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated safetensors header (file has {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ValueError(f"{self.path}: truncated safetensors header (header says {n} bytes, file has "
                                 f"{size - 8})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        for name, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e.get('dtype')!r}")
            if self.data_start + e["data_offsets"][1] > size:
                raise ValueError(f"{self.path}: tensor {name} runs past the end of the file (truncated)")

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = e["data_offsets"]
        dtype = np.dtype(_DTYPES[e["dtype"]])
        if end - start != dtype.itemsize * int(np.prod(e["shape"], dtype=np.int64)):
            raise ValueError(f"{self.path}: tensor {name} has {end - start} bytes, its shape needs "
                             f"{dtype.itemsize * int(np.prod(e['shape']))}")
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + start, shape=tuple(e["shape"]))


class HfWeights:
    """The weights of an HF model directory: model.safetensors, sharded safetensors with
    model.safetensors.index.json, or pytorch_model*.bin. `get(name)` returns one tensor as numpy."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._where: dict[str, Any] = {}
        index = self.dir / "model.safetensors.index.json"
        bin_index = self.dir / "pytorch_model.bin.index.json"
        if index.exists():
            files: dict[str, SafetensorsFile] = {}
            for name, file in _weight_map(index).items():
                if file not in files:
                    if not (self.dir / file).exists():
                        raise ValueError(f"{index}: shard {file} is missing from {self.dir}")
                    files[file] = SafetensorsFile(self.dir / file)
                if name not in files[file].entries:
                    raise ValueError(f"{index}: names tensor {name} in {file}, but {file} does not contain it")
                self._where[name] = files[file]
        elif (self.dir / "model.safetensors").exists():
            f = SafetensorsFile(self.dir / "model.safetensors")
            self._where = dict.fromkeys(f.entries, f)
        elif bin_index.exists() or (self.dir / "pytorch_model.bin").exists():
            files = sorted(set(_weight_map(bin_index).values())) if bin_index.exists() else ["pytorch_model.bin"]
            for file in files:
                if not (self.dir / file).exists():
                    raise ValueError(f"{bin_index}: shard {file} is missing from {self.dir}")
                for name, t in _torch_load(self.dir / file).items():
                    self._where[name] = t
        else:
            raise ValueError(f"{self.dir}: no model.safetensors, model.safetensors.index.json or "
                             "pytorch_model*.bin found")
        for name in [n for n in self._where if n.endswith(_BUFFERS)]:
            del self._where[name]

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        src = self._where[name]
        return src.get(name) if isinstance(src, SafetensorsFile) else _torch_to_numpy(src)


def _weight_map(index: Path) -> dict[str, str]:
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: expected JSON with a 'weight_map', got an error ({e})") from None


def _torch_load(path: Path) -> dict[str, Any]:
    import torch  # optional: only .bin checkpoints need it

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"{path}: cannot read as a PyTorch state dict ({e})") from None


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ----------------------------------------------------------------------------- writing


def dtype_name(dtype: Any) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype: cannot store {np.dtype(dtype)} in safetensors") from None


def plan_shards(specs: list[tuple[str, tuple[int, ...], Any]], max_shard_bytes: int) -> list[list[int]]:
    """Indices of `specs` (name, shape, dtype) grouped into shards of at most max_shard_bytes (a tensor
    larger than that gets a shard of its own), in order."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], Any]],
                      arrays: Iterable[np.ndarray]) -> None:
    """Writes tensors `specs` (name, shape, dtype) whose data come from `arrays`, one at a time, in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, dtype), a in zip(specs, arrays, strict=True):
            if tuple(a.shape) != tuple(shape) or np.dtype(a.dtype) != np.dtype(dtype):
                raise ValueError(f"tensor {name}: expected {shape} {np.dtype(dtype)}, got {a.shape} {a.dtype}")
            np.ascontiguousarray(a).tofile(f)  # straight from the buffer, no bytes copy


def write_weights(directory: Path, specs: list[tuple[str, tuple[int, ...], Any]], arrays: Iterator[np.ndarray],
                  max_shard_bytes: int) -> None:
    """model.safetensors, or model-XXXXX-of-YYYYY.safetensors shards plus model.safetensors.index.json."""
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", specs, arrays)
        return
    weight_map, total = {}, 0
    for k, idx in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        part = [specs[i] for i in idx]
        write_safetensors(directory / file, part, (next(arrays) for _ in part))
        for name, shape, dtype in part:
            weight_map[name] = file
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (transformers' convention: GB = 10^9, GiB = 2^30)."""
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    raise ValueError(f"--max-shard-size: expected a size like 5GB or 500MiB, got {text!r}")
