"""Checks of single config values, shared by the model config and the RoPE scalings: each error names the
field and what was expected."""

from __future__ import annotations

import enum
import math
from typing import Any

import numpy as np


def number(field: str, value: Any, *, integer: bool = False, gt: float | None = None,
           ge: float | None = None) -> Any:
    """One numeric value, as an int (`integer`) or a float, within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    if integer:
        if not float(value).is_integer():
            raise ValueError(f"{field}: expected an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if gt is not None and not value > gt:
        raise ValueError(f"{field}: expected a value > {gt}, got {value!r}")
    if ge is not None and not value >= ge:
        raise ValueError(f"{field}: expected a value >= {ge}, got {value!r}")
    return value


def set_field(obj: Any, field: str, value: Any) -> None:
    """Sets a field of a frozen dataclass (its __post_init__ normalising a value)."""
    object.__setattr__(obj, field, value)


def member(field: str, kind: type[enum.Enum], value: Any) -> Any:
    """A config string (or the member itself) as a member of the Enum `kind`."""
    try:
        return value if isinstance(value, kind) else kind(value)
    except ValueError:
        raise ValueError(f"{field}: expected one of {[m.value for m in kind]}, got {value!r}") from None
