"""Reading a compiled program's HLO text: which kernels run inside the ring's loops.

The ring is a `while` loop whose body holds the `collective-permute` that moves K/V (the computations it
calls, conditionals' branches and fusions, hold its block kernels); a fused block kernel shows up there as a custom call
(`tpu_custom_call` for Pallas on TPU, `__cudnn$fmha...` for cuDNN on GPU).
"""

from __future__ import annotations

import re
from collections import Counter

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_CALLED = re.compile(r"(?:body|condition|to_apply|calls|branch_computations|true_computation|false_computation)="
                     r"\{?(%[\w.\-]+(?:, %[\w.\-]+)*)\}?")
_RING_LOOP = re.compile(r" while\(.*body=%([\w.\-]+).*op_name=\"[^\"]*/shard_map/[^\"]*\"")  # loops in a shard_map
KERNELS = ("tpu_custom_call", "__cudnn$fmha")  # Pallas / Mosaic on TPU, cuDNN's fused attention on GPU
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _computations(text: str) -> dict[str, str]:
    """computation name -> its lines."""
    out, name, lines = {}, None, []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            name, lines = header.group(1), []
        elif line == "}" and name is not None:
            out[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    return out


def _closure(comps: dict[str, str], root: str) -> str:
    """The text of `root` and of every computation it calls, transitively."""
    seen, todo, texts = set(), [root], []
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        texts.append(comps[name])
        for group in _CALLED.findall(comps[name]):
            todo.extend(x.strip().lstrip("%") for x in group.split(","))
    return "\n".join(texts)


def ring_loop_kernels(text: str) -> list[Counter]:
    """For each ring loop (a `while` loop inside a shard_map whose own body sends with `collective-permute`):
    the fused attention kernels (custom calls named in `KERNELS`) that run inside it, with their counts."""
    comps = _computations(text)
    bodies = sorted({m for c in comps.values() for m in _RING_LOOP.findall(c)})
    return [Counter(t for t in _TARGET.findall(_closure(comps, b)) if t.startswith(KERNELS))
            for b in bodies if "collective-permute" in comps.get(b, "")]
