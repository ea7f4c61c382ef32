"""The sliding window (Mistral's, Qwen's): a query sees itself and the `window` - 1 keys before it."""

from __future__ import annotations


def effective(window: int | None, keys: int) -> int | None:
    """The window a kernel must apply over `keys` key slots: None when it covers them all (plain causal:
    no key is ever `window` or more tokens back), else `window`."""
    return None if window is None or window >= keys else window


def refuse(window: int | None, keys: int, where: str) -> None:
    """A ValueError naming `sliding_window` when it is shorter than the `keys` a kernel that cannot apply
    it would span (`where`: which kernel and what to do instead)."""
    if effective(window, keys) is not None:
        raise ValueError(f"sliding_window: a window of {window} tokens, shorter than the {keys} tokens {where}")
