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
_WHILE_BODY = re.compile(r" while\(.*body=%([\w.\-]+)")
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
    """For each `while` loop whose own body sends with `collective-permute` (a ring loop, not a loop that
    merely contains one): the custom-call targets that run inside it, with their counts."""
    comps = _computations(text)
    bodies = sorted({m for c in comps.values() for m in _WHILE_BODY.findall(c)})
    return [Counter(_TARGET.findall(_closure(comps, b))) for b in bodies if "collective-permute" in comps.get(b, "")]
