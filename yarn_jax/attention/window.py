"""The sliding window (Mistral's, Qwen's): a query sees itself and the `window` - 1 keys before it."""

from __future__ import annotations


def effective(window: int | None, keys: int) -> int | None:
    """The window a kernel must apply over `keys` key slots: None when it covers them all (plain causal:
    no key is ever `window` or more tokens back), else `window`."""
    return None if window is None or window >= keys else window

